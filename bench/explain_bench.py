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

import time
from collections import Counter
from pathlib import Path

from bench import harness, loadgen
from bench.photos import photo_jpegs
from bench.servers import bento_model, bento_server

NAME = "explain-bench"


def parse_args(argv: list[str] | None = None):
    p = harness.parser(__doc__, "explain_bench.json", logs=False)
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
    return p.parse_args(argv)


def explain_load(url: str, folder: Path, jpegs: list[bytes], honour_retry_after: bool) -> loadgen.Http:
    """POST /explain; any status counts as answered; a 503 waits its Retry-After when honoured."""
    wait = {"on_503": "retry-after"} if honour_retry_after else {}
    cycle = (loadgen.upload("/explain", "image", f"{n}.jpg", f, "image/jpeg", expect="any", **wait)
             for n, f in enumerate(loadgen.body_files(folder, jpegs)))  # fmt: skip
    return loadgen.Http(url, tuple(cycle), timeout_s=120)


def measure(url: str, args, jpegs: list[bytes], work: Path) -> dict:
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
    rows = []
    for limit, row in results["runs"].items():
        s, b = row["steady"], row["burst"]
        ratio = b["p99_ms"] / s["p99_ms"] if s["p99_ms"] and b["p99_ms"] else float("nan")
        statuses = ", ".join(f"{v} x {k}" for k, v in row["explain_statuses"].items())
        rows.append([limit, f"{s['p50_ms']:.0f} / {s['p99_ms']:.0f} ms", f"{b['p50_ms']:.0f} / {b['p99_ms']:.0f} ms",
                     f"**{ratio:.2f}x** (target <= 2x)", s["errors"] + b["errors"], statuses])  # fmt: skip
    header = ["explain limit", "steady p50 / p99", "burst p50 / p99", "p99 burst / steady", "/predict errors",
              "/explain answers"]  # fmt: skip
    return (f"/predict ({results['predict_clients']} clients) with {results['explain_clients']} concurrent /explain "
            f"clients, simple_cnn at {results['size']}, {results['phase_seconds']:g} s per phase\n\n"
            + harness.table(header, rows))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def runs(work: Path, _stop) -> dict:
        results = {k: getattr(args, k) for k in ("size", "predict_clients", "explain_clients")}
        results["phase_seconds"] = args.seconds
        results["ignore_retry_after"], results["runs"] = args.ignore_retry_after, {}
        jpegs, _ = photo_jpegs(args.shared, 16)
        bento_model(work, NAME, args.size)
        for limit in [int(x) for x in args.explain_limits.split(",") if x.strip()]:
            with bento_server(work, NAME, work / f"server-{limit}.log", max_concurrent_explains=limit) as srv:
                results["runs"][limit] = measure(srv.url, args, jpegs, work)
        return results

    harness.run("explain-bench", args, runs, render)


if __name__ == "__main__":
    main()
