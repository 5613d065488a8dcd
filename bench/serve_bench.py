"""Serving benchmark: the service (compiled, and on Keras) beside LitServe, Ray Serve and
`mlflow models serve`, and against the model's own speed in process, in rounds.

    python -m bench.serve_bench [--models resnet50] [--rounds 3] [--levels 1,32,1,128,1]
                                [--servers imgcls,imgcls-f32,imgcls-keras,litserve,litserve-ov,ray]
                                [--quick] [--out FILE]

One run registers an untrained model per case in a temporary MLflow store (alias
`champion`), with a parity set of 200 of the benchmark's photos (so the service may serve
its compiled build), and copies that registered version into a temporary BentoML store:
ResNet50 at 224x224 (`weights=none`: speed does not depend on weight values; the default
case) or the demo model (`simple_cnn` at 32x32, `--quick`), 10 classes. `--models vgg16`
trains instead (issue 20's bf16 target): the product's default command on 800 CIFAR-10
photos at 224 px with ../shared's ImageNet VGG16 file; its own parity set; accuracy,
macro-F1 and top-1 agreement with Keras on its test split for Keras, OpenVINO f32 and
bf16 side by side. The same real
JPEGs (CIFAR-10 photos from ../shared upscaled to 256x256, or generated ones) and the same
load generator (bench.loadgen's `predict_load`, sent by Locust: POST /predict, multipart
field `image`) go to:

  (a) in process, `model.predict` and `predict_on_batch` at batch 1, 8, 32 (the model's
      own speed; `predict_on_batch` is the call every Keras server makes), and its
      OpenVINO build (`openvino-f32`, and `openvino-bf16` where OpenVINO reports BF16)
      at batch 1 and 32, compiled as the LitServe peer compiles it;
  imgcls       the service as it ships (`bentoml serve`, two HTTP fronts and one model
               process, the bounded-wait batcher of service/batching.py, `--runtime auto`:
               the compiled build in the best precision that matched Keras on the parity
               set; what it chose, and why, is read from /metadata and printed);
  imgcls-f32   the same with `--precision f32` (the compiled build in f32);
  imgcls-keras the same with `--runtime keras` (Keras computes: the path before issue 20);
  imgcls-1p    the default service in one process (`imgcls serve --one-process`);
  imgcls-base  the default service of another checkout (`--base-tree PATH`, e.g. a `git
               worktree` of the commit before a change): before and after, same rounds;
  litserve     LitServe 0.2.19 on the Keras model, `max_batch_size=32, batch_timeout=0.01`
               (bench/peers/): what its users do;
  litserve-ov  the same LitServe serving the same OpenVINO build in f32 (`--runtime openvino`);
  ray          Ray Serve 2.60 on the Keras model, `@serve.batch(max_batch_size=32,
               batch_wait_timeout_s=0.01)`;
  mlflow       `mlflow models serve --env-manager local`: it takes no image upload, so the
               client decodes and resizes each JPEG (before timing) and sends JSON tensors.

The default `--servers` leaves out imgcls-1p and mlflow (name them to add them: mlflow,
~2 images/s on ResNet50, adds about 5 minutes, which would take the default run past 25):
the six others take about 18 minutes on 2 cores where Keras runs ResNet50 at ~20 images/s,
about twice that on a 2-core AVX2-only VM (~7 images/s). The peers decode with imgcls.images.decode_image + prepare_image and compute on
the registered version's own `.keras` file: all do the same work. Every server is started
once; then `--rounds` rounds each run the levels (concurrency 1, 32, 1, 128, 1) against
every server in turn (bench.rounds), the model itself in this process just before each c=1
level of each server, with the engine that server computes with (`model` for Keras,
`model openvino-f32`, `model openvino-bf16`: its own batch-1 latency moments before, the
reference of the c=1 target). The report (bench.report) gives the CPU's flags and what
each server computes with, min / median / max across rounds per level (images/s, p50,
p99), where the time goes per process (CPU ms per image from bench.sampling; the service's
front /predict and model /classify times from its access log, mean batch from /metrics)
and PASS/FAIL for the targets of issues 10 and 20, with the stage that stops a failed one;
it writes JSON. Servers run on free loopback ports; their process groups are stopped at
the end, also on errors and Ctrl-C.
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
from bench.cases import CASES, CLASSES, TRAINED, Case, parity_images, register_case, train_case  # noqa: E402
from bench.inprocess import (  # noqa: E402
    batch1_sender,
    compiled_engines,
    keras_engine,
    openvino_capabilities,
    preprocess_ms,
    raw_predict,
    test_split_quality,
)
from bench.machine import bench_home, cpu_flags, machine, quiet_environment  # noqa: E402
from bench.photos import PHOTO_SIZE, photo_jpegs  # noqa: E402
from bench.servers import (  # noqa: E402
    mlflow_probabilities,
    mlflow_server,
    peer_runtime,
    peer_server,
    server_side,
    service_probe,
    service_runtime,
    service_server,
)

ROOT = Path(__file__).resolve().parents[1]
SERVERS = (
    "imgcls",
    "imgcls-base",
    "imgcls-f32",
    "imgcls-keras",
    "imgcls-1p",
    "litserve",
    "litserve-ov",
    "ray",
    "mlflow",
)
# The default run (issue 20's rows): imgcls-1p and mlflow on request only.
DEFAULT_SERVERS = ("imgcls", "imgcls-f32", "imgcls-keras", "litserve", "litserve-ov", "ray")
# Requests per level: (at concurrency 1, per client above it). ResNet50 at 224 runs ~20-25
# images/s on 2 cores with Keras: 24 lone requests give a steady p50 in ~1-2 s; 4 per
# client (128 at c=32, ~6 s; 512 at c=128, ~25 s) keep a round of one Keras server near
# 40 s (a compiled one less): three rounds of the six default servers take ~18 minutes
# with start-up. `mlflow models serve` (~2 images/s there: it parses a 1 MB JSON tensor a
# request) gets 8 lone requests and one per client.
# VGG16 costs ~4x ResNet50's compute: half the requests.
REQUESTS = {"resnet50": (24, 4), "demo": (48, 2), "vgg16": (12, 2)}
MLFLOW_REQUESTS = (8, 1)
# Above concurrency 1, at least this many requests (a c=32 level of ResNet50 is 128).
MIN_BURST = {"resnet50": 128, "demo": 64, "vgg16": 64}
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
        srv = service_server(case, True, args, log, name)
    elif name == "mlflow":
        srv = mlflow_server(case, args, work)
    else:
        srv = peer_server(name, case, log)
    print(f"  starting {name}", flush=True)
    return stack.enter_context(srv), log


def target(name: str, srv, log: Path, case: Case, jpegs, bodies, client, args, work: Path) -> rounds.Target:
    """What the rounds send to one server (a fresh Locust child per level: each level's
    users bring their own connections) and read from it."""
    requests = functools.partial(request_count, args.requests, case.key, name == "mlflow")
    if name == "mlflow":
        send = loadgen.invocations_load(srv.url, work / "load", bodies, args.level_timeout)
        return rounds.Target(name, send, requests, sampling.cpu_counter(srv.pid))
    send = loadgen.predict_load(srv.url, work / "load", jpegs, args.level_timeout)
    if name in report.SERVICES:
        return rounds.Target(name, send, requests, sampling.cpu_counter(srv.pid, sampling.service_role(name)),
                             service_probe(client, srv.url, log), server_side)  # fmt: skip
    hold = functools.partial(hold_group, srv.pid) if name.startswith("litserve") else None
    return rounds.Target(name, send, requests, sampling.cpu_counter(srv.pid, sampling.peer_role), hold=hold)


def hold_group(pid: int, stopped: bool) -> None:
    """SIGSTOP / SIGCONT a server's process group (its sockets stay open): LitServe's idle
    workers poll their queues, ~10% of a core each, which the server measured would lose.
    Ray Serve is left running: its health checks would count a stopped spell as a failure."""
    os.killpg(pid, signal.SIGSTOP if stopped else signal.SIGCONT)


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


def bench_case(case: Case, jpegs: list[bytes], args: argparse.Namespace, work: Path, stop, test=None) -> dict:
    """The model's own speed (a trained case's: also its `test` split's quality per
    engine), then every server started and measured in rounds."""
    import numpy as np

    from imgcls.images import load_image

    inputs = np.stack([load_image(data, (case.size, case.size)) for data in jpegs])
    bodies = [json.dumps({"inputs": x[None].tolist()}).encode() for x in inputs]
    out: dict = {"model": case.name, "version": case.version, "bento_tag": case.bento_tag}
    out["preprocess_ms_p50"] = preprocess_ms(jpegs, case.size)
    out["mlflow_body_kb"] = sum(map(len, bodies)) / len(bodies) / 1024
    print(f"  (a) in-process model.predict, predict_on_batch and the OpenVINO build, {case.key}", flush=True)
    engines = compiled_engines(case, work / f"openvino-{case.key}")
    out["a"], reference = raw_predict(case, inputs, lambda batch: max(48, 4 * batch), engines)
    if test:
        out["test_split"] = test_split_quality(case, test, engines)
    own = model_targets(case, inputs, engines)
    with contextlib.ExitStack() as stack:
        targets, out["max_prob_gap"], out["runtime"] = [], {}, {}
        for name in args.server_list:
            srv, log = start_server(name, case, args, work, stack)
            client = stack.enter_context(loadgen.probe_client(args.level_timeout))
            out["runtime"][name] = served_runtime(name, srv, client)
            out["max_prob_gap"][name] = probability_gap(name, srv, client, jpegs, bodies, reference)
            targets.append(target(name, srv, log, case, jpegs, bodies, client, args, work))
        for t in targets:
            loadgen.run_level(t.send, t.requests(32), 32, args.level_timeout, stop)
        # Before each server's c=1 levels, the model itself with that server's engine.
        references = {name: ref for name in args.server_list if (ref := own.get(report.engine(out, name)))}
        out["rounds"] = rounds.run_rounds(
            targets, args.rounds, args.level_list, args.level_timeout, stop, reference=references
        )
    return out


def model_targets(case: Case, inputs, engines: dict) -> dict[str, rounds.Target]:
    """Engine (keras, openvino-f32, ...) -> the model itself at c=1 in this process with it."""
    lone = REQUESTS[case.key][0]
    return {engine: rounds.Target(report.model_name(engine), batch1_sender(call, inputs), lambda c: lone,
                                  only=frozenset({1}))
            for engine, call in ({report.KERAS: keras_engine(case)} | engines).items()}  # fmt: skip


def served_runtime(name: str, srv, client) -> dict:
    """What computes a server's answers (a service: its /metadata), printed."""
    runtime = service_runtime(client, srv.url) if name in report.SERVICES else peer_runtime(name)
    print(f"    {name} serves {runtime['name']} {runtime['precision']}: {runtime['reason']}", flush=True)
    return runtime


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        default="resnet50",
        help="comma-separated cases: resnet50, demo, vgg16 (trained; needs ../shared)",
    )
    parser.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help=f"comma-separated, from {','.join(SERVERS)} (default: {','.join(DEFAULT_SERVERS)})",
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
    parser.add_argument("--quick", action="store_true", help="demo model, 2 rounds (~4 minutes): a smoke run")
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
    parser.add_argument("--base-tree", type=Path, help="checkout that imgcls-base serves from")
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
    if "imgcls-base" in args.server_list and not (args.base_tree and (args.base_tree / "service").is_dir()):
        parser.error("--servers imgcls-base needs --base-tree: a checkout of this project")
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
    """SIGTERM and SIGINT set the returned event (the Locust child stops at once instead of
    finishing its level) and unwind: the `with` blocks stop the servers."""
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
        args.cache_dir = work / "serve-cache"  # the services' compiled builds, shared, dropped after
        info = machine() | {"cpu_flags": cpu_flags(), "openvino_capabilities": openvino_capabilities()}
        results: dict = {"machine": info, "images": f"{len(jpegs)} JPEGs at {PHOTO_SIZE}: {source}"}
        results["settings"] = {"levels": args.level_list, "rounds": args.rounds, "servers": args.server_list,
                               "level_timeout_s": args.level_timeout, "front_workers": args.front_workers}  # fmt: skip
        cases = {}
        for key in args.cases:
            if key in TRAINED:
                print(f"{key}: training on photos, then registering", flush=True)
                case, test = train_case(key, work, args.shared)
                cases[key] = bench_case(case, jpegs, args, work, stop, test)
                continue
            print(f"{key}: registering", flush=True)
            parity_set = parity_images(CASES[key][1], args.shared)
            cases[key] = bench_case(register_case(key, work, parity_set=parity_set), jpegs, args, work, stop)
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
