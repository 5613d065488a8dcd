"""bench.rollout's analysis on synthetic records: one promotion at t=10 s whose switch
completes at 13 s, steady answers of 100 ms elsewhere and slow ones during the swap."""

from __future__ import annotations

import threading
import time

import pytest

from bench import rollout
from bench.loadgen import Record
from bench.sampling import Usage

MOVE = rollout.Move(at=10.0, old="1", new="2", kind="promote")


def rec(start: float, seconds: float, version: str | None, error: str | None = None) -> Record:
    return Record(0, start, start + seconds, 200 if error is None else None, version, error)


def synthetic() -> list[Record]:
    """v1 answers every 0.5 s until 13 s (slow, 400 ms, from 11 s), v2 from 12 s on."""
    records = [rec(t / 2, 0.1, "1") for t in range(0, 22)]  # 0.0 .. 10.5 s
    records += [rec(11.0 + t / 2, 0.4, "1") for t in range(4)]  # 11.0 .. 12.5: last old ends 12.9
    records += [rec(12.0 + t / 2, 0.1, "2") for t in range(36)]  # 12.0 .. 29.5
    return sorted(records, key=lambda r: r.start)


def test_move_timing_measures_from_the_move_to_first_new_and_last_old():
    timing = rollout.move_timing(synthetic(), MOVE)
    assert timing["first_new_s"] == pytest.approx(2.1)  # the 12.0 s request ends at 12.1
    assert timing["last_old_s"] == pytest.approx(2.9)  # the 12.5 s v1 request ends at 12.9
    assert timing["old_after_first_new"] == 2  # v1 answers ending at 12.4 and 12.9, after 12.1
    assert timing["other_versions"] == 0
    # Requests started before the move do not count, whatever they got.
    assert timing["requests"] == len([r for r in synthetic() if r.start >= 10.0])


def test_answers_before_the_move_and_after_the_next_one_are_left_out():
    # 19.9 s: started before the next move (20 s), answered by the version it brought back.
    records = [rec(9.0, 2.0, "1"), rec(10.5, 0.1, "2"), rec(19.9, 0.4, "1"), rec(20.5, 0.1, "1")]
    timing = rollout.move_timing(records, MOVE, until=20.0)
    assert timing["first_new_s"] == pytest.approx(0.6)
    assert timing["last_old_s"] is None  # the 9.0 s request started before the move
    assert rollout.swap_window(timing) == pytest.approx((10.0, 10.0 + 0.6 + rollout.SETTLE_S))


def test_analyse_splits_latency_into_swap_windows_and_steady_state():
    result = rollout.analyse(synthetic(), [MOVE], [], since=0.0, until=30.0, poll_interval_s=2, load_s=0.5)
    assert result["requests"] == 62 and result["failed"] == 0
    assert result["target_s"] == pytest.approx(3.5)
    # The swap window is [10, 12.9 + 2): the four slow v1 answers count there, never as steady.
    assert result["swap"]["p99_ms"] == pytest.approx(400, abs=1)
    assert result["steady"]["p99_ms"] == pytest.approx(100, abs=1)
    assert result["moves"][0]["window_p99_ms"] == pytest.approx(400, abs=1)
    assert all(ok for ok, _ in rollout.targets("demo", result)[1:3])  # 2.1 and 2.9 s <= 3.5 s
    checks = dict((line.split(": ", 1)[1][:8], ok) for ok, line in rollout.targets("demo", result))
    assert checks["0 failed"] is False  # 62 requests, not 2,000
    assert checks["p99 in s"] is False  # 400 ms is 4x steady's 100 ms


def test_a_late_switch_and_a_failure_fail_their_targets():
    records = [rec(10.5, 0.1, "1"), rec(16.0, 0.1, "2"), rec(17.0, 0.1, None, error="HTTP 503: busy")]
    result = rollout.analyse(records, [MOVE], [], since=0.0, until=30.0, poll_interval_s=2, load_s=1.0)
    assert result["failed"] == 1 and result["first_error"] == "HTTP 503: busy"
    passed = [ok for ok, _ in rollout.targets("resnet50", result)]
    assert passed[:2] == [False, False]  # a failure; the first new answer at 6.1 s > 4 s
    assert passed[2] is True  # the last old answer ended 0.6 s after the move


def test_split_usage_puts_cpu_and_memory_on_the_side_of_the_window():
    mib = 2**20

    def usage(cpu: float, rss: int) -> dict:
        return {"model": Usage(cpu, rss * mib, 1), "front": Usage(cpu / 2, 100 * mib, 1)}

    samples = [(0.0, usage(0, 500)), (5.0, usage(2, 500)), (10.0, usage(4, 500)),
               (11.0, usage(5.5, 900)), (12.0, usage(7, 900)), (20.0, usage(9, 500))]  # fmt: skip
    split = rollout.split_usage(samples, [(10.0, 12.0)], since=0.0, until=30.0)
    assert split["swap"]["seconds"] == pytest.approx(2.0)
    assert split["swap"]["cores"]["model"] == pytest.approx(1.5)  # 3 CPU s in 2 s
    assert split["steady"]["cores"]["model"] == pytest.approx(6 / 18)
    assert split["swap"]["peak_rss_by_role"]["model"] == 900 * mib
    assert split["steady"]["peak_rss_by_role"]["model"] == 500 * mib
    assert split["swap"]["peak_rss_bytes"] == 1000 * mib


def test_tables_have_a_row_per_model_and_per_move():
    result = rollout.analyse(synthetic(), [MOVE], [], since=0.0, until=30.0, poll_interval_s=2, load_s=0.5)
    moves = rollout.moves_table({"demo": result}).splitlines()
    assert len(moves) == 3 and moves[2].startswith("| demo | 1 | promote v1 -> v2 |")
    assert "| 2.10 | 2.90 | 3.5 |" in moves[2]
    summary = rollout.summary_table({"demo": result}).splitlines()
    assert summary[2].startswith("| demo | 62 | 0 | 3.5 (2 + 0.5 + 1) | 2.10 s | 2.90 s | 400 / 100 |")


def test_waiting_ends_once_every_recent_answer_has_the_new_version():
    records, versions = [], iter(["1", "1", "2", "2", "2"])

    def send(i: int) -> None:
        now = time.perf_counter()
        records.append(Record(i, now, now, 200, next(versions), None))

    since = time.perf_counter()
    for i in range(2):
        send(i)
    now = time.perf_counter()
    assert not rollout.switched(records, "2", since, hold_s=now - since, now=now)  # only v1 so far
    mark = time.perf_counter()
    for i in range(3):
        send(i)
    now = time.perf_counter()
    assert rollout.switched(records, "2", mark, hold_s=now - mark, now=now)  # every answer since mark is v2
    assert not rollout.switched(records, "2", since, hold_s=now - since, now=now)  # v1 answers in the hold
    stop = threading.Event()
    stop.set()
    assert rollout.wait_switched(records, "3", since, 0.0, timeout_s=5, stop=stop) is False


def test_where_time_goes_splits_the_switch_at_the_last_old_answer():
    result = rollout.analyse(synthetic(), [MOVE], [], since=0.0, until=30.0, poll_interval_s=2, load_s=0.5)
    assert result["moves"][0]["first_new_latency_ms"] == pytest.approx(100)
    move_line, cpu_line = rollout.where_time_goes("demo", result)
    assert (
        "move -> last old answer 2.90 s" in move_line and "last old -> first new answer -0.80 s" in move_line
    )
    assert cpu_line.startswith("demo: CPU cores of the server's processes, swap / steady: model 0.00 / 0.00")
