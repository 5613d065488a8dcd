"""`python -m bench.serve_bench --quick`, for real: the demo model registered, the service
(two processes, and `--one-process`), LitServe, Ray Serve and `mlflow models serve` started
on free ports, one round of concurrency 1, 32, 1 against each (the full round adds 128, 1),
the report and its JSON. Figures are not checked (they belong in docs/benchmarks.md); that
every server answered and the report shows each of them is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_measures_the_service_beside_its_peers(tmp_path):
    out = tmp_path / "serve.json"
    cmd = [sys.executable, "-m", "bench.serve_bench", "--quick", "--rounds", "1", "--levels", "1,32,1"]
    cmd += ["--out", str(out)]
    cmd += ["--logs", str(tmp_path / "logs")]
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras")}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = results["results"]["demo"]["rounds"]
    # Each server in turn; the model itself in process just before each c=1 level (the reference).
    expected = []
    servers = ("imgcls", "imgcls-1p", "litserve", "ray", "mlflow")
    for server in servers:
        for c in (1, 32, 1):
            expected += [("model", 1), (server, 1)] if c == 1 else [(server, c)]
    assert [(r["server"], r["concurrency"]) for r in rows] == expected
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in rows), [r["first_error"] for r in rows]
    # Every server answered with the same model's probabilities as in process.
    assert max(results["results"]["demo"]["max_prob_gap"].values()) < 1e-3
    for server in servers:
        assert f"| demo | {server} | 2 | 32 |" in done.stdout
    # CPU per image splits into the peers' fronts and model processes too.
    peer = next(r for r in rows if r["server"] == "ray" and r["concurrency"] == 32)
    assert {"front", "model"} <= set(peer["cpu_ms_per_image"])
    for service in ("imgcls", "imgcls-1p"):
        assert f"PASS demo: {service} answers every request: 0 failed" in done.stdout
    # Per way of serving: c=1, c=32 against the best peer and the model, p99 at c=32, errors.
    assert sum(line.startswith(("PASS ", "FAIL ")) for line in done.stdout.splitlines()) == 10
    # One process: no model process of its own, so its one worker counts as the model.
    lone = next(r for r in rows if r["server"] == "imgcls-1p" and r["concurrency"] == 32)
    assert "model" in lone["cpu_ms_per_image"] and "front" not in lone["cpu_ms_per_image"]
