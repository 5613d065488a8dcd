"""Serving benchmark: the service against the model's own limit and `mlflow models serve`.

    python -m bench.serve_bench [--models resnet50,demo] [--concurrency 1,8,32]
                                [--requests N] [--quick] [--out FILE]

One run registers an untrained model per case in a temporary MLflow store (alias
`champion`) and copies that registered version into a temporary BentoML store:
ResNet50 at 224x224 (`weights=none`: speed does not depend on weight values) and the
demo model (`simple_cnn` at 32x32), 10 classes each. Real JPEG files (CIFAR-10 photos
from ../shared upscaled to 256x256, or generated ones) go through, on the same model:

  (a) in-process `model.predict` on the same decoded, resized inputs, one call per batch
      of 1, 8 or 32: the issue's baseline; latency is per call, i.e. per batch;
  (a') the same with `predict_on_batch`, the call the service makes: faster than
      `predict` (no data adapter), so a stricter baseline, reported beside (a);
  (b) the service (`bentoml serve`, two HTTP front processes and one model process)
      with adaptive batching, POST /predict multipart;
  (c) the same service with batching off (IMGCLS_SERVE_BATCHING=false);
  (d) `mlflow models serve -m models:/<name>@champion --env-manager local`, POST
      /invocations {"inputs": [...]}: MLflow takes no image upload, so the client
      decodes and resizes each JPEG with imgcls.images.load_image (before timing).

A bounded load generator (fixed requests per level, threads, a hard time cap per level)
reports images/s and p50/p95/p99 latency per concurrency level. Targets: (b) at the top
concurrency >= 0.85x (a)'s best throughput and >= 3x (d); (b) beats (c); at concurrency
1 the service adds < 15 ms to the model's own batch-1 p50 (a'); and (b), (c) answer
every request. Prints a Markdown table, a table of where the time goes (the service's
access log and /metrics: front /predict, model /classify, mean adaptive batch; CPU ms
per image of the load generator and of each server process), PASS/FAIL lines for the
targets and a NOTE with (b)/(a'), and writes JSON. Every server is started on a free
loopback port and its process group is stopped at the end, also on errors and Ctrl-C.

This script only parses arguments and calls the shared modules: bench.cases (models),
bench.photos (JPEGs), bench.inprocess ((a), (a')), bench.servers ((b)-(d)), bench.loadgen
(levels), bench.sampling (CPU per process), bench.report (tables, targets).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

if not __package__:  # `python bench/serve_bench.py` from a checkout: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import loadgen, report, sampling  # noqa: E402
from bench.cases import CASES, Case, register_case  # noqa: E402
from bench.inprocess import preprocess_ms, raw_predict  # noqa: E402
from bench.machine import bench_home, machine, quiet_environment  # noqa: E402
from bench.photos import PHOTO_SIZE, photo_jpegs  # noqa: E402
from bench.servers import (  # noqa: E402
    mlflow_probabilities,
    mlflow_server,
    server_side,
    service_probabilities,
    service_probe,
    service_server,
)

ROOT = Path(__file__).resolve().parents[1]
# Requests per concurrency level. ResNet50 at 224 runs ~15-25 images/s on 2 CPU cores:
# 96 requests, and 8 per client at higher levels so the top level runs ~10 s and its
# figure is steady; `mlflow models serve` (~2.5 images/s there) keeps 96.
DEFAULT_REQUESTS = {"resnet50": 96, "demo": 384}
REQUESTS_PER_CLIENT = {"resnet50": 8, "demo": 0}
QUICK_REQUESTS = 48
DISTINCT_IMAGES = 32
# One front process spends ~5 ms of CPU per request on one core at most: with the demo
# model (0.1 ms per image) it, not the model, would set the pace. Two use both cores.
FRONT_WORKERS = 2


def bench_service(case, jpegs, batching, reference, args, stop) -> tuple[list[dict], float]:
    """(b) or (c): the levels against `bentoml serve`, and the max probability gap to (a)."""
    levels = args.concurrency_levels
    log = args.log_dir / f"{case.key}-service-{'batching' if batching else 'nobatching'}.log"
    with (
        service_server(case, batching, args, log) as srv,
        loadgen.http_client(max(levels), args.level_timeout) as client,
    ):
        gap = float(abs(service_probabilities(client, srv.url, jpegs) - reference).max())
        send = loadgen.service_sender(client, srv.url, jpegs)
        # The warm-up runs every batch size the top level will, so TensorFlow's
        # per-shape set-up (oneDNN primitives, ~50 ms each on ResNet50) is not timed.
        rows = loadgen.run_levels(
            send, levels, args.requests_for(case.key), args.level_timeout, 4 * max(levels),
            probe=service_probe(client, srv.url, log), cpu=sampling.cpu_counter(srv.pid),
            server_side=server_side, stop=stop,
        )  # fmt: skip
        return rows, gap


def bench_mlflow(case, bodies, reference, args, work, stop) -> tuple[list[dict], float]:
    """(d): the levels against `mlflow models serve` with client-side decoded JSON tensors."""
    levels = args.concurrency_levels
    with (
        mlflow_server(case, args, work) as srv,
        loadgen.http_client(max(levels), args.level_timeout) as client,
    ):
        gap = float(abs(mlflow_probabilities(client, srv.url, bodies) - reference).max())
        send = loadgen.mlflow_sender(client, srv.url, bodies)
        requests = args.requests_for(case.key, mlflow=True)
        rows = loadgen.run_levels(
            send, levels, requests, args.level_timeout, min(8, max(levels)),
            cpu=sampling.cpu_counter(srv.pid), stop=stop,
        )  # fmt: skip
        return rows, gap


def bench_case(case: Case, jpegs: list[bytes], args: argparse.Namespace, work: Path, stop) -> dict:
    """All four ways of serving one registered model."""
    import numpy as np

    from imgcls.images import load_image

    inputs = np.stack([load_image(data, (case.size, case.size)) for data in jpegs])
    bodies = [json.dumps({"inputs": x[None].tolist()}).encode() for x in inputs]
    out: dict = {"model": case.name, "version": case.version, "bento_tag": case.bento_tag}
    out["preprocess_ms_p50"] = preprocess_ms(jpegs, case.size)
    out["mlflow_body_kb"] = sum(map(len, bodies)) / len(bodies) / 1024
    print(f"  (a) in-process model.predict and (a') predict_on_batch, {case.key}", flush=True)
    out["a"], reference = raw_predict(case, inputs, args.requests_for(case.key))
    print(f"  (b) service, adaptive batching, {case.key}", flush=True)
    out["b"], out["b_max_prob_gap"] = bench_service(case, jpegs, True, reference, args, stop)
    print(f"  (c) service, batching off, {case.key}", flush=True)
    out["c"], out["c_max_prob_gap"] = bench_service(case, jpegs, False, reference, args, stop)
    print(f"  (d) mlflow models serve, {case.key}", flush=True)
    out["d"], out["d_max_prob_gap"] = bench_mlflow(case, bodies, reference, args, work, stop)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet50,demo", help="comma-separated cases: resnet50, demo")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument(
        "--requests",
        type=int,
        help="requests per level (default: resnet50 max(96, 8 x concurrency), 96 for mlflow; demo 384; "
        "--quick 48)",
    )
    parser.add_argument("--quick", action="store_true", help="demo model only, few requests (~2 minutes)")
    parser.add_argument("--level-timeout", type=float, default=60, help="hard cap in seconds per level (60)")
    parser.add_argument("--max-batch-size", type=int, help="service's largest adaptive batch (its default)")
    parser.add_argument("--max-latency-ms", type=int, help="service's batching wait (its default)")
    parser.add_argument(
        "--front-workers",
        type=int,
        default=FRONT_WORKERS,
        help=f"service's HTTP front processes, for (b) and (c) alike ({FRONT_WORKERS})",
    )
    parser.add_argument(
        "--shared", type=Path, default=ROOT.parent / "shared", help="folder with data/ (photos)"
    )
    parser.add_argument("--logs", type=Path, help="keep the servers' logs in this folder (default: dropped)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / ".imgcls/bench/serve_bench.json", help="JSON results file"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.models = "demo"
        args.requests = args.requests or QUICK_REQUESTS
    args.cases = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(CASES)}")
    try:
        args.concurrency_levels = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        parser.error(f"--concurrency: comma-separated whole numbers, not {args.concurrency!r}")
    if not args.concurrency_levels or min(args.concurrency_levels) < 1:
        parser.error("--concurrency: levels must be 1 or more")
    args.requests_for = lambda key, mlflow=False: functools.partial(request_count, args.requests, key, mlflow)
    return args


def request_count(fixed: int | None, key: str, mlflow: bool, concurrency: int) -> int:
    """Requests of one level (or of one in-process batch size): `--requests`, else the default."""
    if fixed:
        return fixed
    per_client = 0 if mlflow else REQUESTS_PER_CLIENT[key]
    return max(DEFAULT_REQUESTS[key], per_client * concurrency)


def stop_on_signals() -> threading.Event:
    """SIGTERM and SIGINT set the returned event (the load threads stop at once instead of
    finishing their level) and unwind: the `with` blocks stop the servers."""
    stopping = threading.Event()

    def handler(signum, _frame) -> None:
        stopping.set()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stopping


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, run every case in a temporary MLflow and BentoML home, report."""
    quiet_environment()
    args = parse_args(argv)
    stop = stop_on_signals()
    started = time.perf_counter()
    with bench_home("imgcls-serve-bench-", args.logs) as (work, args.log_dir):
        jpegs, source = photo_jpegs(args.shared, DISTINCT_IMAGES)
        results: dict = {"machine": machine(), "images": f"{len(jpegs)} JPEGs at {PHOTO_SIZE}: {source}"}
        results["settings"] = {"concurrency": args.concurrency_levels, "level_timeout_s": args.level_timeout}
        cases = {}
        for key in args.cases:
            print(f"{key}: registering", flush=True)
            cases[key] = bench_case(register_case(key, work), jpegs, args, work, stop)
        results |= {"results": cases, "seconds": time.perf_counter() - started}
        results["load_average_at_end"] = os.getloadavg()[0]
    write_and_print(results, args)


def write_and_print(results: dict, args: argparse.Namespace) -> None:
    """The JSON file (with targets and notes) and the printed report."""
    top = max(args.concurrency_levels)
    results = report.with_targets(results, top)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(report.render(results, top, str(args.out)))


if __name__ == "__main__":
    main()
