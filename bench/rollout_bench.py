"""Rollout benchmark: steady load while the champion is promoted and rolled back.

    python -m bench.rollout_bench [--models resnet50,demo] [--swaps 5] [--poll-interval 2]
                                  [--concurrency N] [--quick] [--out FILE]

Per case (ResNet50 at 224 with `weights=none`, the demo `simple_cnn` at 32) two versions
are registered in a temporary SQLite MLflow store and the alias `champion` is put on the
first. The real service follows it (`imgcls serve --source mlflow --poll-interval S`)
while concurrent clients POST real JPEGs to /predict; during that load the benchmark
moves the alias with `MlflowClient().set_registered_model_alias` `--swaps` times each way
(promote v1 -> v2, roll back v2 -> v1), waiting after each move until every answer comes
from the new version and then `--steady` seconds more (plus a share of the poll interval
that differs per move, so the moves land at different points of the poll cycle). It
keeps driving until at least `--min-requests` requests were made.

Reported per model (definitions in bench/rollout.py): requests and failures; per move the
time to the first answer by the new version and to the last by the old one, against
poll interval + load time + 1 s, the load time being the follower's own swap path timed
once in this process before the load (bench.inprocess.follower_load_s); p99 in the swap windows against
steady state; images/s, CPU of the model process and peak RSS of the server's process
tree (bench.sampling.TreeSampler) in the swap windows against steady state.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from bench import harness, loadgen, rollout
from bench.cases import ALIAS, CASES, register_case
from bench.inprocess import follower_load_s
from bench.photos import PHOTO_SIZE, photo_jpegs
from bench.sampling import TreeSampler
from bench.servers import following_server

# ResNet50 answers ~20 images/s on 2 cores: 8 clients keep the model busy with batches
# of ~8 without queueing past a second; the demo model needs more to be busy at all.
DEFAULT_CONCURRENCY = {"resnet50": 8, "demo": 16}
DISTINCT_IMAGES = 32
FRONT_WORKERS = 2  # as in serve_bench: one front caps the demo model near 200 requests/s
# Answers that must all come from the new version before a switch counts as done: a
# little more than one ResNet50 batch at concurrency 8 on 2 cores.
HOLD_S = 2.0
# Load before the steady state starts: TensorFlow sets up each batch shape on first use.
WARM_S = 8.0


def move_alias(client, name: str, old: str, new: str, kind: str) -> rollout.Move:
    """Point `champion` at `new`; the move's time is taken just before the call."""
    at = time.perf_counter()
    client.set_registered_model_alias(name, ALIAS, new)
    return rollout.Move(at, old, new, kind, (time.perf_counter() - at) * 1000)


def service_metadata(url: str, *keys: str):
    """A field of the service's /metadata (with several model workers: the one that
    answered), e.g. how long its last swap took to load, check, compile and warm the new
    version ("following", "last_load_s"), or what computes its answers ("runtime")."""
    import httpx

    try:
        value = httpx.get(f"{url}/metadata", timeout=30).json()
        for key in keys:
            value = value[key]
        return value
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def run_moves(
    client, name: str, versions: tuple[str, str], records, args, stop, url: str
) -> list[rollout.Move]:
    """`--swaps` promotions and rollbacks, each waited for, then `--steady` s of steady load."""
    v1, v2 = versions
    moves = []
    for n in range(2 * args.swaps):
        old, new, kind = (v1, v2, "promote") if n % 2 == 0 else (v2, v1, "rollback")
        moves.append(move_alias(client, name, old, new, kind))
        switched = rollout.wait_switched(records, new, moves[-1].at, HOLD_S, args.switch_timeout, stop)
        load_s = service_metadata(url, "following", "last_load_s")
        moves[-1] = dataclasses.replace(moves[-1], service_load_s=load_s)
        print(f"    {kind} v{old} -> v{new}: {'switched' if switched else 'NOT switched'}", flush=True)
        time.sleep(args.steady + poll_phase(n) * args.poll_interval)
    return moves


def poll_phase(n: int) -> float:
    """A fraction in [0, 1) that differs for each move (golden-ratio steps). Without it
    every move lands at the same point of the poll cycle (the wait before it is a switch,
    which follows a poll, plus fixed sleeps), so all moves would show one poll delay."""
    return (n * 0.618034) % 1


def bench_case(key: str, jpegs: list[bytes], args, work: Path, stop) -> dict:
    """Register two versions, serve the first, move the alias under load, analyse."""
    from mlflow import MlflowClient

    print(f"{key}: registering two versions", flush=True)
    first, second = register_case(key, work), register_case(key, work)
    client = MlflowClient()
    client.set_registered_model_alias(first.name, ALIAS, first.version)
    load_s = follower_load_s(second, work / "load-probe-cache")
    print(f"  follower load + check + warm-up in process: {load_s:.1f} s", flush=True)
    concurrency = args.concurrency or DEFAULT_CONCURRENCY[key]
    log = args.log_dir / f"{key}-rollout.log"
    with following_server(first, args, log, work) as srv, TreeSampler(srv.pid) as sampler:
        load = loadgen.predict_load(srv.url, work / "load", jpegs, args.request_timeout)
        with loadgen.Locust(load, concurrency) as child:
            child.go()
            time.sleep(WARM_S)
            since = time.perf_counter()
            time.sleep(args.steady)
            versions = (first.version, second.version)
            moves = run_moves(client, first.name, versions, child.records, args, stop, srv.url)
            while len(child.records) < args.min_requests and not stop.is_set():
                time.sleep(0.5)
            runtime = service_metadata(srv.url, "runtime")
            child.stop()
            records = child.wait().records
        until = time.perf_counter()
    result = rollout.analyse(records, moves, sampler.samples, since, until, args.poll_interval, load_s)
    if args.records:
        args.records.mkdir(parents=True, exist_ok=True)
        rows = [[r.start, r.end, r.status, r.version, r.error] for r in records]
        (args.records / f"{key}-records.json").write_text(json.dumps({"since": since, "until": until,
                                                                      "records": rows}))  # fmt: skip
    return {"model": first.name, "versions": [first.version, second.version], "concurrency": concurrency,
            "runtime": runtime, **result}  # fmt: skip


def parse_args(argv: list[str] | None = None):
    p = harness.parser(__doc__, "rollout_bench.json", front_workers=FRONT_WORKERS)
    p.add_argument("--models", default="resnet50,demo", help="comma-separated cases: resnet50, demo")
    p.add_argument("--swaps", type=int, default=5, help="promote + rollback cycles (5: 10 alias moves)")
    p.add_argument("--poll-interval", type=float, default=2.0, help="service's --poll-interval, s (2)")
    p.add_argument("--concurrency", type=int, help="clients (default: resnet50 8, demo 16, as for 2 cores)")
    p.add_argument("--steady", type=float, default=8.0, help="steady load after each switch, s (8)")
    p.add_argument("--min-requests", type=int, default=2000, help="drive at least this many (2000)")
    p.add_argument("--switch-timeout", type=float, default=120, help="most to wait for a switch, s")
    p.add_argument("--request-timeout", type=float, default=60, help="client timeout per request, s")
    p.add_argument(
        "--model-workers",
        type=int,
        default=1,
        help="model processes, each following on its own: 'last old' is when all of them agree (1)",
    )
    p.add_argument("--quick", action="store_true", help="demo only, 2 cycles, 300 requests (~2 min)")
    p.add_argument(
        "--records", type=Path, help="also write every request as JSON into this folder, one file per model"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.swaps, args.min_requests, args.steady = "demo", 2, 300, 4.0
    args.cases = harness.names(p, args.models, CASES, "--models")
    if args.swaps < 1 or args.poll_interval <= 0:
        p.error("--swaps must be 1 or more and --poll-interval above 0 (0 turns following off)")
    return args


def measure(args, work: Path, stop) -> dict:
    jpegs, source = photo_jpegs(args.shared, DISTINCT_IMAGES)
    results: dict = {"images": f"{len(jpegs)} JPEGs at {PHOTO_SIZE}: {source}"}
    results["load_time_how"] = (
        "the follower's swap path (MLflow download, load .keras, check, warm-up) timed once in the "
        "benchmark process before its load starts (other jobs on the machine still run)"
    )
    results["settings"] = {k: getattr(args, k) for k in ("swaps", "poll_interval", "steady", "min_requests",
                                                         "front_workers", "model_workers")}  # fmt: skip
    return results | {"results": {key: bench_case(key, jpegs, args, work, stop) for key in args.cases}}


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, run every case in a temporary MLflow and BentoML home, report."""
    args = parse_args(argv)
    harness.run(
        "rollout-bench",
        args,
        lambda work, stop: measure(args, work, stop),
        rollout.render,
        rollout.with_targets,
    )


if __name__ == "__main__":
    main()
