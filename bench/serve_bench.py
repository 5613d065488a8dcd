"""Serving benchmark: the service beside LitServe, Ray Serve and `mlflow models serve`,
and against the model's own speed in process, in rounds.

    python -m bench.serve_bench [--models resnet50] [--rounds 3] [--levels 1,32,1,128,1]
                                [--servers imgcls,imgcls-1p,litserve,ray,mlflow] [--quick] [--out FILE]

One run registers an untrained model per case in a temporary MLflow store (alias
`champion`) and copies that registered version into a temporary BentoML store: ResNet50
at 224x224 (`weights=none`: speed does not depend on weight values; the default case) or
the demo model (`simple_cnn` at 32x32, `--quick`), 10 classes. The same real JPEGs
(CIFAR-10 photos from ../shared upscaled to 256x256, or generated ones) and the same load
generator (bench.loadgen's `service_sender`: POST /predict, multipart field `image`) go to:

  (a) in process, `model.predict` and `predict_on_batch` at batch 1, 8, 32 (the model's
      own speed; `predict_on_batch` is the call every server makes);
  imgcls    the service (`bentoml serve`, two HTTP fronts and one model process, the
            bounded-wait batcher of service/batching.py);
  imgcls-1p the same service in one process (`imgcls serve --one-process`): the front
            holds the model, no second hop;
  litserve  LitServe 0.2.19, `max_batch_size=32, batch_timeout=0.01` (bench/peers/);
  ray       Ray Serve 2.60, `@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)`;
  mlflow    `mlflow models serve --env-manager local`: it takes no image upload, so the
            client decodes and resizes each JPEG (before timing) and sends JSON tensors.

The peers decode with imgcls.images.decode_image + prepare_image and call
`predict_on_batch` on the registered version's own `.keras` file: all do the same work.
Every server is started once; then `--rounds` rounds each run the levels (concurrency 1,
32, 1, 128, 1) against every server in turn (bench.rounds), the model itself in this
process just before each c=1 level of each server (`model`: its own batch-1 latency
moments before, the reference of the c=1 target). The report (bench.report)
gives min / median / max across rounds per level (images/s, p50, p99), where the time goes
per process (CPU ms per image from bench.sampling; the service's front /predict and model
/classify times from its access log, mean batch from /metrics) and PASS/FAIL for the
targets of issue 10, with the stage that stops a failed one; it writes JSON. Servers run
on free loopback ports; their process groups are stopped at the end, also on errors and
Ctrl-C. Default run: about 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
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

from bench import loadgen, report, rounds, sampling  # noqa: E402
from bench.cases import CASES, CLASSES, Case, register_case  # noqa: E402
from bench.inprocess import batch1_sender, preprocess_ms, raw_predict  # noqa: E402
from bench.machine import bench_home, machine, quiet_environment  # noqa: E402
from bench.photos import PHOTO_SIZE, photo_jpegs  # noqa: E402
from bench.servers import (  # noqa: E402
    mlflow_probabilities,
    mlflow_server,
    peer_server,
    server_side,
    service_probe,
    service_server,
)

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ("imgcls", "imgcls-1p", "litserve", "ray", "mlflow")
# Requests per level: (at concurrency 1, per client above it). ResNet50 at 224 runs ~20-25
# images/s on 2 cores: 24 lone requests give a steady p50 in ~1-2 s; 4 per client (128 at
# c=32, ~6 s; 512 at c=128, ~25 s) keep a round of one server near 40 s: three rounds of
# four servers take ~15 minutes with start-up. `mlflow models serve` (~2 images/s there:
# it parses a 1 MB JSON tensor a request) gets 8 lone requests and one per client.
REQUESTS = {"resnet50": (24, 4), "demo": (48, 2)}
MLFLOW_REQUESTS = (8, 1)
# Above concurrency 1, at least this many requests (a c=32 level of ResNet50 is 128).
MIN_BURST = {"resnet50": 128, "demo": 64}
DISTINCT_IMAGES = 32
# One front process spends ~5 ms of CPU per request on one core at most: with the demo
# model (0.1 ms per image) it, not the model, would set the pace. Two use both cores.
FRONT_WORKERS = 2
# Untimed requests at concurrency 32 per server before round 1 (connections, first batches).
WARM_REQUESTS = 64


def start_server(name: str, case: Case, args: argparse.Namespace, work: Path, stack):
    """One server, started and stopped with `stack`; its pid and URL."""
    log = args.log_dir / f"{case.key}-{name}.log"
    if name in report.SERVICES:
        srv = service_server(case, True, args, log, one_process=name == "imgcls-1p")
    elif name == "mlflow":
        srv = mlflow_server(case, args, work)
    else:
        srv = peer_server(name, case, log)
    print(f"  starting {name}", flush=True)
    return stack.enter_context(srv), log


def target(name: str, srv, log: Path, case: Case, jpegs, bodies, client, args) -> rounds.Target:
    """What the rounds send to one server and read from it."""
    requests = functools.partial(request_count, args.requests, case.key, name == "mlflow")
    if name == "mlflow":
        send = loadgen.mlflow_sender(client, srv.url, bodies)
        return rounds.Target(name, send, requests, sampling.cpu_counter(srv.pid), before_level=client.renew)
    send = loadgen.service_sender(client, srv.url, jpegs)
    if name in report.SERVICES:
        return rounds.Target(name, send, requests, sampling.cpu_counter(srv.pid, sampling.service_role(name)),
                             service_probe(client, srv.url, log), server_side, before_level=client.renew)  # fmt: skip
    return rounds.Target(name, send, requests, sampling.cpu_counter(srv.pid, sampling.peer_role),
                         before_level=client.renew)  # fmt: skip


def probability_gap(name: str, srv, client, jpegs, bodies, reference) -> float:
    """Largest |p - p(a)| over the first answers (the labels each server returns)."""
    import numpy as np

    if name == "mlflow":
        return float(abs(mlflow_probabilities(client, srv.url, bodies) - reference).max())
    gaps = []
    for row, data in zip(reference, jpegs[:4], strict=False):
        answer = client.post(
            f"{srv.url}/predict", files={"image": ("p.jpg", data)}, data={"top_k": len(CLASSES)}
        )
        answer.raise_for_status()
        gaps += [abs(p["probability"] - row[CLASSES.index(p["label"])]) for p in answer.json()["predictions"]]
    return float(np.max(gaps))


def bench_case(case: Case, jpegs: list[bytes], args: argparse.Namespace, work: Path, stop) -> dict:
    """The model's own speed, then every server started and measured in rounds."""
    import numpy as np

    from imgcls.images import load_image

    inputs = np.stack([load_image(data, (case.size, case.size)) for data in jpegs])
    bodies = [json.dumps({"inputs": x[None].tolist()}).encode() for x in inputs]
    out: dict = {"model": case.name, "version": case.version, "bento_tag": case.bento_tag}
    out["preprocess_ms_p50"] = preprocess_ms(jpegs, case.size)
    out["mlflow_body_kb"] = sum(map(len, bodies)) / len(bodies) / 1024
    print(f"  (a) in-process model.predict and predict_on_batch, {case.key}", flush=True)
    out["a"], reference = raw_predict(case, inputs, lambda batch: max(48, 4 * batch))
    with contextlib.ExitStack() as stack:
        own = rounds.Target(
            report.MODEL, batch1_sender(case, inputs), lambda c: REQUESTS[case.key][0], only=frozenset({1})
        )
        targets, out["max_prob_gap"] = [], {}
        for name in args.server_list:
            srv, log = start_server(name, case, args, work, stack)
            # Each server's levels get clients of their own, renewed per level (LevelClient).
            client = stack.enter_context(loadgen.LevelClient(max(args.level_list), args.level_timeout))
            out["max_prob_gap"][name] = probability_gap(name, srv, client, jpegs, bodies, reference)
            targets.append(target(name, srv, log, case, jpegs, bodies, client, args))
        for t in targets:
            loadgen.run_level(t.send, t.requests(32), 32, args.level_timeout, stop)
        out["rounds"] = rounds.run_rounds(
            targets, args.rounds, args.level_list, args.level_timeout, stop, reference=own
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet50", help="comma-separated cases: resnet50, demo")
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help="comma-separated, from " + ",".join(SERVERS)
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the levels against every server (3)")
    parser.add_argument("--levels", default=",".join(map(str, rounds.ROUND_LEVELS)),
                        help="concurrency levels of a round, in order (1,32,1,128,1)")  # fmt: skip
    parser.add_argument(
        "--requests",
        type=int,
        help="requests per level (default: resnet50 24 at c=1, else max(128, 4 x c); mlflow 8, else c; "
        "demo 48, else max(64, 2 x c))",
    )
    parser.add_argument("--quick", action="store_true", help="demo model, 2 rounds (~3 minutes): a smoke run")
    parser.add_argument("--level-timeout", type=float, default=60, help="hard cap in seconds per level (60)")
    parser.add_argument("--max-batch-size", type=int, help="service's largest batch (its default)")
    parser.add_argument("--max-latency-ms", type=int, help="service's queue deadline (its default)")
    parser.add_argument(
        "--front-workers",
        type=int,
        default=FRONT_WORKERS,
        help=f"service's HTTP front processes ({FRONT_WORKERS})",
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
        args.models, args.rounds = "demo", min(args.rounds, 2)
    args.cases = [m.strip() for m in args.models.split(",") if m.strip()]
    args.server_list = [m.strip() for m in args.servers.split(",") if m.strip()]
    for what, chosen, known in (("--models", args.cases, CASES), ("--servers", args.server_list, SERVERS)):
        if not chosen or set(chosen) - set(known):
            parser.error(f"{what}: choose from {sorted(known)}")
    try:
        args.level_list = [int(c) for c in args.levels.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--levels: comma-separated whole numbers, not {args.levels!r}")
    if not args.level_list or min(args.level_list) < 1 or args.rounds < 1:
        parser.error("--levels: levels must be 1 or more; --rounds: 1 or more")
    # The peers queue whatever comes; the service sheds beyond 64 requests per front (a
    # 503, service/shedding.py), and connections do not split evenly between fronts. Every
    # level is admitted here, so the figures compare speed, not shedding.
    args.max_concurrent_requests = max(args.level_list)
    return args


def request_count(fixed: int | None, key: str, mlflow: bool, concurrency: int) -> int:
    """Requests of one level: `--requests`, else the default of the case and server."""
    if fixed:
        return fixed
    lone, per_client = MLFLOW_REQUESTS if mlflow else REQUESTS[key]
    if concurrency == 1:
        return lone
    return per_client * concurrency if mlflow else max(MIN_BURST[key], per_client * concurrency)


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
        results["settings"] = {"levels": args.level_list, "rounds": args.rounds, "servers": args.server_list,
                               "level_timeout_s": args.level_timeout, "front_workers": args.front_workers}  # fmt: skip
        cases = {}
        for key in args.cases:
            print(f"{key}: registering", flush=True)
            cases[key] = bench_case(register_case(key, work), jpegs, args, work, stop)
        results |= {"results": cases, "seconds": time.perf_counter() - started}
        results["load_average_at_end"] = os.getloadavg()[0]
    write_and_print(results, args)


def write_and_print(results: dict, args: argparse.Namespace) -> None:
    """The JSON file (with targets) and the printed report."""
    results = report.with_targets(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(report.render(results, str(args.out)))


if __name__ == "__main__":
    main()
