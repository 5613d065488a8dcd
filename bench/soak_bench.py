"""Soak benchmark: ten minutes of mixed traffic at a steady rate against the real service.

    python -m bench.soak_bench [--minutes 10] [--rate 20] [--front-workers 2] [--quick] [--out FILE]

The demo model (the course CNN at 32x32, untrained, registered in a temporary store) is
served by `imgcls serve`'s command with two HTTP fronts. An open loop starts `--rate`
requests per second whatever the answers do (bench.loadgen.drive's open loop, sent by
Locust): /predict,
/predict_batch (4 images), /explain and bad inputs (not an image, a truncated JPEG, a
wrong form field, an upload over the byte limit) in the fixed mix of bench/soak.py.
Good requests must answer 200 and bad ones a 4xx. The server's process tree is sampled
every second, per process (bench.sampling.TreeSampler).

Reported: a row per minute (requests, failures, 5xx, 4xx of bad inputs, p50/p99 of the
good requests and p99 of /predict, load average), each process's resident memory at the
end of minute 1 and at the end, and the targets: 0 responses 5xx, growth under 10% per
process, every minute's p99 within 2x of the median minute's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench import harness, loadgen, soak
from bench.cases import register_case
from bench.photos import PHOTO_SIZE, photo_jpegs
from bench.sampling import TreeSampler, bentoml_role
from bench.servers import service_server

DISTINCT_IMAGES = 32
# 20 requests/s keeps the demo model and two fronts at about a third of two cores,
# leaving room for the clients and for other jobs: a soak, not a stress test.
DEFAULT_RATE = 20.0


def per_process(proc, server_pid: int) -> str:
    """A TreeSampler key per process: its role and pid ("front 1234")."""
    return f"{bentoml_role(proc, server_pid)} {proc.pid}"


def run_soak(args, work: Path, jpegs: list[bytes], stop) -> dict:
    """Register the demo model, serve it, drive the open loop, analyse."""
    from service.settings import ServiceSettings

    case = register_case("demo", work)
    max_upload = ServiceSettings.model_fields["max_upload_bytes"].default
    duration_s = args.minutes * 60
    loads: list[tuple[float, float]] = []
    args.cache_dir = work / "serve-cache"  # the service's compiled build, dropped after
    with (
        service_server(case, True, args, args.log_dir / "soak-service.log") as srv,
        TreeSampler(srv.pid, interval_s=1.0, classify=per_process) as sampler,
    ):
        load = soak.mixed_load(srv.url, work / "load", jpegs, max_upload, args.request_timeout)
        with loadgen.Locust(load, args.max_in_flight, duration_s=duration_s, rate_per_s=args.rate) as child:
            started = time.perf_counter()
            child.go()
            while (run := child.wait(stop, timeout_s=min(60.0, duration_s))) is None:
                loads.append((time.perf_counter(), os.getloadavg()[0]))
                print(f"  {(time.perf_counter() - started) / 60:.1f} min", flush=True)
            loads.append((time.perf_counter(), os.getloadavg()[0]))
        since, until, records = run.started, time.perf_counter(), run.records
    minutes = soak.minute_rows(records, since, args.minutes)
    for row in minutes:  # the load average sampled nearest the end of each minute
        end = since + row["minute"] * 60
        row["load"] = min(loads, key=lambda t: abs(t[0] - end))[1] if loads else float("nan")
    return {
        "model": case.name,
        "requests": len(records),
        "minutes": minutes,
        "memory": soak.memory_growth(sampler.samples, since, until, min(soak.WARM_UP_S, duration_s / 4)),
        "first_errors": [r.error for r in records if not r.ok][:5],
    }


def parse_args(argv: list[str] | None = None):
    p = harness.parser(__doc__, "soak_bench.json", front_workers=2)
    p.add_argument("--minutes", type=int, default=10, help="length of the soak in minutes (10)")
    p.add_argument("--rate", type=float, default=DEFAULT_RATE, help="requests started per second (20)")
    p.add_argument("--max-in-flight", type=int, default=64, help="Locust users, at most (64)")
    p.add_argument("--request-timeout", type=float, default=30, help="client timeout per request, s (30)")
    p.add_argument("--max-batch-size", type=int, default=32, help="service's largest batch (32)")
    p.add_argument("--max-latency-ms", type=int, default=10_000, help="service's batching deadline (10000)")
    p.add_argument("--quick", action="store_true", help="one minute (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes = 1
    if args.minutes < 1 or args.rate <= 0:
        p.error("--minutes must be 1 or more and --rate above 0")
    return args


def measure(args, work: Path, stop) -> dict:
    jpegs, source = photo_jpegs(args.shared, DISTINCT_IMAGES)
    settings = {k: getattr(args, k) for k in ("minutes", "rate", "front_workers", "max_in_flight")}
    return {"images": f"{len(jpegs)} JPEGs at {PHOTO_SIZE}: {source}", "settings": settings,
            "mix_per_40": dict(soak.MIX), "result": run_soak(args, work, jpegs, stop)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, soak the service in a temporary MLflow and BentoML home, report."""
    args = parse_args(argv)
    harness.run(
        "soak-bench", args, lambda work, stop: measure(args, work, stop), soak.render, soak.with_targets
    )


if __name__ == "__main__":
    main()
