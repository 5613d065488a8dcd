"""/predict latency under a burst of /explain: steady state, then the same /predict load with
50 concurrent /explain clients, for each explain limit given.

    python -m bench.explain_bench                       # explain limits 1, 2 (the default), 64
    python -m bench.explain_bench --explain-limits 2 --seconds 10 --out results.json

The issue's target: /predict's p99 during the burst stays within 2x of steady state. The
explain clients honour Retry-After, as the 503's contract asks; `--ignore-retry-after`
makes them retry at once (the worst case: the shed requests then cost the front CPU).
The model is an untrained simple_cnn (weights do not change the cost) in a temporary
BentoML store; one front, one model process, as `imgcls serve` runs by default.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench import loadgen
from bench.machine import machine, quiet_environment
from bench.photos import photo_jpegs
from bench.servers import bento_model, bento_server

ROOT = Path(__file__).resolve().parents[1]
NAME = "explain-bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224, help="model input size (224)")
    p.add_argument("--predict-clients", type=int, default=4, help="closed-loop /predict clients (4)")
    p.add_argument(
        "--explain-clients", type=int, default=50, help="concurrent /explain clients in the burst (50)"
    )
    p.add_argument(
        "--explain-limits", default="1,2,64", help="IMGCLS_SERVE_MAX_CONCURRENT_EXPLAINS values to run"
    )
    p.add_argument("--seconds", type=float, default=20, help="length of each phase (20)")
    p.add_argument("--ignore-retry-after", action="store_true", help="explain clients retry a 503 at once")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


def explain_load(url: str, folder: Path, jpegs: list[bytes], honour_retry_after: bool) -> loadgen.Http:
    """POST /explain; any status counts as answered; a 503 waits its Retry-After when honoured."""
    wait = {"on_503": "retry-after"} if honour_retry_after else {}
    cycle = (loadgen.upload("/explain", "image", f"{n}.jpg", f, "image/jpeg", expect="any", **wait)
             for n, f in enumerate(loadgen.body_files(folder, jpegs)))  # fmt: skip
    return loadgen.Http(url, tuple(cycle), timeout_s=120)


def measure(url: str, args: argparse.Namespace, jpegs: list[bytes], work: Path) -> dict:
    """/predict percentiles in steady state and during the /explain burst."""
    predict = loadgen.predict_load(url, work / "load", jpegs, timeout_s=120)
    loadgen.drive(predict, args.predict_clients, requests=32)  # warm-up
    steady = loadgen.drive(predict, args.predict_clients, duration_s=args.seconds)
    explain = explain_load(url, work / "load", jpegs, not args.ignore_retry_after)
    with loadgen.Locust(explain, args.explain_clients) as burst:
        burst.go()
        time.sleep(1)  # let the burst reach the server
        during = loadgen.drive(predict, args.predict_clients, duration_s=args.seconds)
        burst.stop()
        counts = Counter(r.status for r in burst.wait().records)
    return {
        "steady": loadgen.summarize(steady.records, args.seconds),
        "burst": loadgen.summarize(during.records, args.seconds),
        "explain_statuses": {str(k): v for k, v in sorted(counts.items(), key=str)},
    }


def render(results: dict) -> str:
    lines = [
        f"/predict ({results['predict_clients']} clients) with {results['explain_clients']} concurrent /explain "
        f"clients, simple_cnn at {results['size']}, {results['seconds']:g} s per phase",
        "",
        "| explain limit | steady p50 / p99 | burst p50 / p99 | p99 burst / steady | /predict errors | /explain answers |",
        "|---|---|---|---|---|---|",
    ]
    for limit, row in results["runs"].items():
        s, b = row["steady"], row["burst"]
        ratio = b["p99_ms"] / s["p99_ms"] if s["p99_ms"] and b["p99_ms"] else float("nan")
        statuses = ", ".join(f"{v} x {k}" for k, v in row["explain_statuses"].items())
        lines.append(
            f"| {limit} | {s['p50_ms']:.0f} / {s['p99_ms']:.0f} ms | {b['p50_ms']:.0f} / {b['p99_ms']:.0f} ms "
            f"| **{ratio:.2f}x** (target <= 2x) | {s['errors'] + b['errors']} | {statuses} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_environment()
    limits = [int(x) for x in args.explain_limits.split(",") if x.strip()]
    results = {
        "machine": machine(),
        **{k: getattr(args, k) for k in ("size", "predict_clients", "explain_clients", "seconds")},
    }
    results["ignore_retry_after"], results["runs"] = args.ignore_retry_after, {}
    jpegs, _ = photo_jpegs(ROOT.parent / "shared", 16)
    with tempfile.TemporaryDirectory(prefix="explain-bench-") as tmp:
        work = Path(tmp)
        bento_model(work, NAME, args.size)
        for limit in limits:
            log = work / f"server-{limit}.log"
            with bento_server(work, NAME, log, max_concurrent_explains=limit) as srv:
                results["runs"][limit] = measure(srv.url, args, jpegs, work)
    print(render(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
