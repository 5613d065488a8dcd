"""bench.report on a saved serving-benchmark result (demo model, concurrency 1 and 2, 16
requests a level, from `python -m bench.serve_bench --models demo --concurrency 1,2
--requests 16`), and bench.loadgen / bench.sampling on tiny real work."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench import loadgen, report, sampling

SAVED = Path(__file__).parent / "data" / "serve_bench_results.json"
TABLE_HEADER = "| case | model | concurrency | images/s | p50 ms | p95 ms | p99 ms | b/a | b/a' | b/d |"


@pytest.fixture
def saved() -> dict:
    return json.loads(SAVED.read_text())


def test_table_has_the_documented_columns_and_a_row_per_level(saved):
    lines = report.table(saved["results"]).splitlines()
    assert lines[0] == TABLE_HEADER  # the columns docs/benchmarks.md shows
    assert len(lines) == 2 + 6 + 2 + 2 + 2  # header, 6 in-process rows, 2 levels of (b), (c), (d)
    b1 = next(line for line in lines if line.startswith("| (b) service, adaptive batching | demo | 1 |"))
    # 171.6 / 504.4 (best predict), / 26564.9 (best predict_on_batch), / 5.5 (d at c=1)
    assert b1.endswith("| 171.6 | 5.2 | 9.7 | 10.4 | 0.34x | 0.01x | 31.49x |")


def test_table_flags_capped_levels_and_errors(saved):
    saved["results"]["demo"]["c"][1] |= {"capped": True, "errors": 3}
    row = next(
        line for line in report.table(saved["results"]).splitlines() if "batching off | demo | 2 " in line
    )
    assert "| 203.1 (capped) (3 errors) |" in row


def test_breakdown_shows_server_times_and_cpu_per_role(saved):
    lines = report.breakdown(saved["results"]).splitlines()
    assert lines[0].endswith("| mean batch | non-200 | CPU ms/image: client / front / model / server |")
    assert "| (b) | demo | 1 | 5.2 | 4.5 | 2.0 | 1.0 | 0 / 0 | 0.7 / 2.5 / 1.9 / 0.0 |" in lines
    assert "| (d) | demo | 2 | 208.4 | - | - | - | - | 1.0 / - / - / 47.5 |" in lines


def test_targets_on_the_saved_run(saved):
    checks = report.targets("demo", saved["results"]["demo"], top=2)
    assert [ok for ok, _ in checks] == [False, None, True, False, True, True]
    assert checks[0][1] == "demo: (b) c=2 99.2/s >= 0.85x (a) model.predict best 504.4/s (0.20x)"
    assert checks[4][1] == "demo: c=1: service adds 4.6 ms to the model's p50 0.6 ms (< 15)"


def test_targets_pass_when_the_service_is_fast_enough_and_fail_on_errors(saved):
    result = copy.deepcopy(saved["results"]["demo"])
    result["b"][1]["images_per_s"] = 450.0  # >= 0.85 x 504.4, > (c) 203.1, >= 3 x (d) 9.3
    assert [ok for ok, _ in report.targets("demo", result, top=2)] == [True, None, True, True, True, True]
    result["c"][0]["errors"] = 2
    ok, line = report.targets("demo", result, top=2)[-1]
    assert not ok and line == "demo: (b) and (c) answer every request: 2 failed"


def test_with_targets_and_render(saved):
    full = report.with_targets(saved, top=2)
    assert [t["passed"] for t in full["targets"]] == [False, True, False, True, True]
    assert full["notes"] == [
        "demo: (b) c=2 is 0.00x (a') predict_on_batch best 26564.9/s (stricter than the issue's (a))"
    ]
    text = report.render(full, top=2, out="results.json")
    assert TABLE_HEADER in text
    assert "\nFAIL demo: (b) c=2 beats (c) 203.1/s\n" in text
    assert "demo: decode+resize p50 0.6 ms; mlflow body 22 KiB; max |p - p(a)|: b 2.2e-08" in text
    assert text.endswith("s in all; JSON: results.json")


def test_drive_records_every_request_and_stops_on_the_event():
    stop = threading.Event()

    def send(i: int) -> loadgen.Answer:
        time.sleep(0.005)
        if i == 5:
            stop.set()
        if i % 4 == 3:
            raise ConnectionError("refused")
        return loadgen.Answer(200, version="2" if i >= 4 else "1")

    records = loadgen.drive(send, concurrency=2, stop=stop)
    assert 6 <= len(records) <= 8  # requests in flight when the event is set still finish
    assert [r.start for r in records] == sorted(r.start for r in records)
    failed = [r for r in records if not r.ok]
    assert failed[0].status is None and failed[0].error == "ConnectionError: refused"
    assert loadgen.first_answer(records, "2").index in (4, 5, 6)
    assert loadgen.last_answer(records, "1").index in (0, 1, 2)
    assert loadgen.first_answer(records, "3") is None
    row = loadgen.summarize(records, seconds=1.0)
    assert (
        row["requests"] + row["errors"] == len(records) and row["first_error"] == "ConnectionError: refused"
    )


def test_run_level_counts_and_caps():
    row = loadgen.run_level(lambda i: loadgen.Answer(200), requests=20, concurrency=4, cap_s=10)
    assert (row["requests"], row["errors"], row["capped"], row["concurrency"]) == (20, 0, False, 4)
    slow = loadgen.run_level(
        lambda i: time.sleep(0.2) or loadgen.Answer(200), requests=100, concurrency=2, cap_s=0.3
    )
    assert slow["capped"] and slow["requests"] < 100
    assert loadgen.percentiles([1.0, 2.0, 3.0])["p50_ms"] == 2.0


def test_tree_sampler_sees_a_child_process_memory(tmp_path):
    code = "import subprocess, sys, time; b = bytearray(64 << 20); subprocess.run([sys.executable, '-c', 'import time; time.sleep(30)'])"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(1.5)
        with sampling.TreeSampler(
            proc.pid, interval_s=0.05, classify=lambda p, root: "root" if p.pid == root else "child"
        ) as sampler:
            time.sleep(0.3)
        assert sampler.peak_rss_by_role["root"] > 64 << 20  # the 64 MiB buffer
        assert "child" in sampler.peak_rss_by_role
        assert sampler.peak_rss_bytes >= sampler.peak_rss_by_role["root"]
        assert len(sampler.samples) >= 3
        cpu = sampling.cpu_counter(proc.pid)()
        assert cpu["client"] > 0 and "server" in cpu  # the tree's root has the "server" role
    finally:
        proc.kill()
        proc.wait()
