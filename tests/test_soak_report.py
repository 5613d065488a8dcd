"""bench.soak's mix, verdicts, per-minute table, memory growth and targets on synthetic data,
and its cycle of requests for the Locust child (its pacing: tests/test_locust_load.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from bench import soak
from bench.loadgen import Record
from bench.sampling import Usage


def test_the_mix_is_spread_over_each_cycle():
    counts = Counter(soak.kind_of(i) for i in range(40))
    assert counts == dict(soak.MIX)
    first_half = Counter(soak.kind_of(i) for i in range(20))
    assert first_half["predict"] == 14 and first_half["explain"] == 1  # evenly, not in runs


def test_the_mix_wants_200_for_good_and_4xx_for_bad_requests(tmp_path):
    load = soak.mixed_load("http://x", tmp_path, [b"a", b"b", b"c"], max_upload_bytes=10, timeout_s=5)
    assert len(load.cycle) == 120  # every kind on every JPEG: lcm(40, 3)
    for i, request in enumerate(load.cycle):
        kind = soak.kind_of(i)
        assert request["label"] == kind and request["expect"] == ("200" if kind in soak.GOOD else "4xx")
    by_kind = {soak.kind_of(i): r for i, r in enumerate(load.cycle)}
    assert (
        by_kind["predict_batch"]["path"] == "/predict_batch" and len(by_kind["predict_batch"]["files"]) == 4
    )
    assert by_kind["wrong_field"]["files"][0][0] == "file" and by_kind["explain"]["path"] == "/explain"
    huge = by_kind["too_big"]["files"][0][2]
    assert Path(huge).read_bytes() == b"\0" * 11  # one byte over the limit


def _records(minutes: int, per_minute: int, slow_minute: int | None = None, fail_at: int | None = None):
    records = []
    for i in range(minutes * per_minute):
        start = i * 60 / per_minute
        latency = 0.5 if slow_minute is not None and int(start // 60) == slow_minute - 1 else 0.02
        status, error = (500, "predict: HTTP 500") if i == fail_at else (200, None)
        records.append(Record(i, start, start + latency, status, None, error))
    return records


def _samples(until: float, start_mb: float, end_mb: float):
    out = []
    for t in range(int(until) + 1):
        mb = start_mb + (end_mb - start_mb) * t / until
        out.append((float(t), {"model 1": Usage(0, int(mb * 1e6), 1), "front 2": Usage(0, 100_000_000, 1)}))
    return out


def test_a_clean_run_passes_every_target():
    records = _records(3, 120)
    rows = soak.minute_rows(records, since=0, minutes=3)
    assert [r["requests"] for r in rows] == [120, 120, 120]
    assert all(r["failed"] == 0 and r["status_5xx"] == 0 for r in rows)
    assert rows[0]["bad_4xx"] == 0  # every synthetic record answered 200 (judged elsewhere)
    result = {"minutes": rows, "memory": soak.memory_growth(_samples(180, 800, 810), 0, 180)}
    assert all(ok for ok, _ in soak.targets(result)), soak.targets(result)


def test_a_5xx_growing_memory_and_a_slow_minute_fail_their_targets():
    records = _records(4, 120, slow_minute=3, fail_at=5)
    rows = soak.minute_rows(records, since=0, minutes=4)
    assert rows[0]["status_5xx"] == 1 and rows[0]["failed"] == 1
    memory = soak.memory_growth(_samples(240, 800, 1000), 0, 240)
    assert 0.15 < memory["model 1"]["growth"] < 0.3 and abs(memory["front 2"]["growth"]) < 1e-9
    failed = [line for ok, line in soak.targets({"minutes": rows, "memory": memory}) if not ok]
    assert any("5xx: 1" in line for line in failed)
    assert any("model 1" in line for line in failed) and not any("front 2" in line for line in failed)
    assert any("p99 per minute" in line for line in failed)
