"""Serving benchmark: the service (compiled, and on Keras) beside LitServe, Ray Serve and
`mlflow models serve`, and against the model's own speed in process, in rounds.

    python -m bench.serve_bench [--models resnet50] [--rounds 3] [--levels 1,32,1,128,1]
                                [--servers imgcls,imgcls-f32,imgcls-keras,litserve,litserve-ov,ray]
                                [--quick] [--out FILE]

Per case, an untrained model registered in a temporary MLflow store (alias `champion`,
with a parity set of 200 of the benchmark's photos, so the service may serve its compiled
build) and copied into a temporary BentoML store: ResNet50 at 224 (`weights=none`, the
default), the demo `simple_cnn` at 32 (`--quick`), or `vgg16`, trained by the product's
default command on 800 CIFAR-10 photos at 224 px with ../shared's ImageNet file (its test
split's accuracy, macro-F1 and agreement with Keras per engine). The same JPEGs and load
(bench.loadgen's `predict_load`: POST /predict, field `image`) go to:

  (a) in process: `model.predict` and `predict_on_batch` at batch 1, 8, 32, and the
      OpenVINO build (`openvino-f32`, `openvino-bf16` where the CPU has it) at 1 and 32;
  imgcls       the service as it ships (`--runtime auto`: what it chose, and why, is
               read from /metadata and printed);
  imgcls-f32   the same with `--precision f32`;  imgcls-keras  with `--runtime keras`;
  imgcls-1p    `imgcls serve --one-process`;
  imgcls-base  the default service of another checkout (`--base-tree PATH`);
  litserve     LitServe 0.2.19 on the Keras model (`max_batch_size=32, batch_timeout=0.01`);
  litserve-ov  the same LitServe on the same OpenVINO build in f32;
  ray          Ray Serve 2.60 on the Keras model (`@serve.batch(32, 0.01)`);
  mlflow       `mlflow models serve --env-manager local` (the client decodes and resizes
               each JPEG before timing and sends JSON tensors).

The default `--servers` leaves out imgcls-1p and mlflow (~2 images/s on ResNet50, ~5
minutes more). The servers start once (two at a time); then every round runs the levels
against each server in turn (bench.rounds), the model itself in process just before each
c=1 level with that server's engine. The report (bench.report): min / median / max per
level, where the time goes per process, PASS/FAIL for issues 10's and 20's targets.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
from pathlib import Path

from bench import harness, loadgen, report, rounds, sampling
from bench.cases import CASES, CLASSES, TRAINED, Case, parity_images, register_case, train_case
from bench.inprocess import (
    batch1_sender,
    compiled_engines,
    keras_engine,
    openvino_capabilities,
    preprocess_ms,
    raw_predict,
    test_split_quality,
)
from bench.photos import PHOTO_SIZE, photo_jpegs
from bench.servers import (
    mlflow_probabilities,
    mlflow_server,
    peer_runtime,
    peer_server,
    server_side,
    service_probe,
    service_runtime,
    service_server,
)

SERVERS = ("imgcls", "imgcls-base", "imgcls-f32", "imgcls-keras", "imgcls-1p", "litserve", "litserve-ov", "ray",
           "mlflow")  # fmt: skip
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
# Servers starting at once: start-up is mostly one process importing or loading at a
# time, so two share 2 cores well; more would push a ResNet50 start past its ready timeout.
START_AT_ONCE = 2


def make_server(name: str, case: Case, args, work: Path):
    """One server (not started yet) and its log."""
    log = args.log_dir / f"{case.key}-{name}.log"
    if name in report.SERVICES:
        return service_server(case, True, args, log, name), log
    if name == "mlflow":
        return mlflow_server(case, args, work), log
    return peer_server(name, case, log), log


def start_servers(names: list[str], case: Case, args, work: Path, stack) -> list:
    """Every server of `names` and its log, launched START_AT_ONCE at a time and waited for
    in this thread (a stop signal ends the wait at once), each stopped with `stack`."""
    made = [make_server(name, case, args, work) for name in names]
    for i in range(0, len(made), START_AT_ONCE):
        batch = [srv for srv, _log in made[i : i + START_AT_ONCE]]
        print(f"  starting {', '.join(names[i : i + START_AT_ONCE])}", flush=True)
        for srv in batch:
            stack.callback(srv.stop)
            srv.launch()
        for srv in batch:
            srv.wait_ready()
    return made


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


def bench_case(case: Case, jpegs: list[bytes], args, work: Path, stop, test=None) -> dict:
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
        client = stack.enter_context(loadgen.probe_client(args.level_timeout))
        for name, (srv, log) in zip(args.server_list, start_servers(args.server_list, case, args, work, stack),
                                    strict=True):  # fmt: skip
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


def parse_args(argv: list[str] | None = None):
    p = harness.parser(__doc__, "serve_bench.json", front_workers=FRONT_WORKERS)
    p.add_argument(
        "--models", default="resnet50", help="comma-separated cases: resnet50, demo, vgg16 (trained)"
    )
    p.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help=f"comma-separated, from {','.join(SERVERS)} (default: {','.join(DEFAULT_SERVERS)})",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds of the levels against every server (3)")
    p.add_argument(
        "--levels",
        default=",".join(map(str, rounds.ROUND_LEVELS)),
        help="concurrency levels of a round, in order (1,32,1,128,1)",
    )
    p.add_argument(
        "--requests",
        type=int,
        help="requests per level (default: resnet50 24 at c=1, else "
        "max(128, 4 x c); mlflow 8, else c; demo 48, else max(64, 2 x c))",
    )
    p.add_argument("--quick", action="store_true", help="demo model, 2 rounds (~4 minutes): a smoke run")
    p.add_argument("--level-timeout", type=float, default=60, help="hard cap in seconds per level (60)")
    p.add_argument("--max-batch-size", type=int, help="service's largest batch (its default)")
    p.add_argument("--max-latency-ms", type=int, help="service's queue deadline (its default)")
    p.add_argument("--base-tree", type=Path, help="checkout that imgcls-base serves from")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.rounds = "demo", min(args.rounds, 2)
    args.cases = harness.names(p, args.models, CASES, "--models")
    args.server_list = harness.names(p, args.servers, SERVERS, "--servers")
    if "imgcls-base" in args.server_list and not (args.base_tree and (args.base_tree / "service").is_dir()):
        p.error("--servers imgcls-base needs --base-tree: a checkout of this project")
    try:
        args.level_list = [int(c) for c in args.levels.split(",") if c.strip()]
    except ValueError:
        p.error(f"--levels: comma-separated whole numbers, not {args.levels!r}")
    if not args.level_list or min(args.level_list) < 1 or args.rounds < 1:
        p.error("--levels: levels must be 1 or more; --rounds: 1 or more")
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


def measure(args, work: Path, stop) -> dict:
    """Every case: registered (or trained), then benchmarked."""
    jpegs, source = photo_jpegs(args.shared, DISTINCT_IMAGES)
    args.cache_dir = work / "serve-cache"  # the services' compiled builds, shared, dropped after
    results: dict = {"machine": {"openvino_capabilities": openvino_capabilities()}}
    results["images"] = f"{len(jpegs)} JPEGs at {PHOTO_SIZE}: {source}"
    results["settings"] = {"levels": args.level_list, "rounds": args.rounds, "servers": args.server_list,
                           "level_timeout_s": args.level_timeout, "front_workers": args.front_workers}  # fmt: skip
    cases = {}
    for key in args.cases:
        print(f"{key}: {'training on photos, then ' if key in TRAINED else ''}registering", flush=True)
        if key in TRAINED:
            case, test = train_case(key, work, args.shared)
        else:
            case, test = register_case(key, work, parity_set=parity_images(CASES[key][1], args.shared)), None
        cases[key] = bench_case(case, jpegs, args, work, stop, test)
    return results | {"results": cases}


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, run every case in a temporary MLflow and BentoML home, report."""
    args = parse_args(argv)
    harness.run(
        "serve-bench", args, lambda work, stop: measure(args, work, stop), report.render, report.with_targets
    )


if __name__ == "__main__":
    main()
