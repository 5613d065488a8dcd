"""GPU benchmark (issue 11): the real service on one GPU, against the model's own speed.

    bash bench/gpu_bench.sh [--quick]          # installs the carried wheels, then runs this
    python -m bench.gpu_bench [--quick] [--out DIR]

1. The model's own throughput: `bench.gpu_model` in a child process per precision
   (float32, bfloat16 via Keras mixed precision), ResNet50 built by training/model.py with
   random weights, `Predictor.probabilities` at batch 1, 32 and 128; the float32 (and, if
   served, bfloat16) model is saved as .keras into a temporary BentoML store.
2. The stages in this process, with the front's own functions: JPEG decode and resize
   per image, the resize also the first time an input size is seen (a resize traced per
   shape, as `jax.image.resize` is, would pay a compile there).
3. The service: `bentoml serve service.service:ImageClassifier` (`--source bentoml`, `--gpu`
   when there is one, N front workers, max batch tuned for the GPU), driven with real
   photos as JPEGs of varied sizes by bench.loadgen from several Locust processes, at
   concurrency 1, 32 and 128 after a warm-up that compiles every padded batch shape:
   images/s, p50/p95/p99, CPU ms per image of the clients, fronts and model process
   (bench.sampling), GPU utilisation and memory (`nvidia-smi` sampled every 200 ms).
4. One Markdown table (gpu_bench.md) with the stage that limits throughput, one log
   (gpu_bench.log, with the server's log tail) and the JSON, in --out ($OUT, ./gpu-out).

Only the model process may touch the GPU: this process and the load generators run with
JAX_PLATFORMS=cpu, the service's fronts hide the GPU from themselves
(service.predictor.keep_off_accelerators), and every model process runs with
XLA_PYTHON_CLIENT_PREALLOCATE=false so `nvidia-smi` shows what it really uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import harness, loadgen, sampling
from bench.gpu_model import NAME
from bench.gpu_report import render
from bench.harness import ROOT, cpu_name, quiet_environment
from bench.photos import varied_jpegs

# Every model process reports real GPU memory instead of JAX's 75% preallocation, and the
# model children and the service share compiled shapes through one JAX cache folder.
MODEL_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "KERAS_BACKEND": "jax"}
DISTINCT_JPEGS = 48
# One Locust process per 4 cores: each spends ~0.7 ms of CPU per request (a 15 KB upload,
# on 2 cores here) and one process is one core, near 1,500 requests/s. The fronts get the rest but 2 cores
# (the model process and its batcher): ~5 ms of front CPU per request is ~200 images/s
# per front, so 16 cores give 4 clients and 10 fronts for the 2,000 images/s.
CLIENT_SHARE = 4


class GpuSampler:
    """`nvidia-smi` utilisation and memory every 200 ms in the background (inert without it)."""

    QUERY = ["--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "200"]

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.available = shutil.which("nvidia-smi") is not None
        self.proc = None

    def __enter__(self) -> GpuSampler:
        if self.available:
            self.proc = subprocess.Popen(["nvidia-smi", *self.QUERY], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.perf_counter(), util, mem))

    def window(self, start: float, end: float) -> dict:
        """Mean utilisation (%) and peak memory (MiB) of the first GPU between two times."""
        found = [(u, m) for t, u, m in self.samples if start <= t <= end]
        if not found:
            return {}
        return {
            "gpu_util_pct": sum(u for u, _ in found) / len(found),
            "gpu_mem_mib": max(m for _, m in found),
        }

    def __exit__(self, *exc) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=5)


class Log:
    """Lines to the terminal and to the one log file."""

    def __init__(self, path: Path) -> None:
        self.path, self.start = path, time.perf_counter()  # appended to: gpu_bench.sh starts it

    def __call__(self, text: str) -> None:
        line = f"[{time.perf_counter() - self.start:6.1f} s] {text}"
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")

    def append(self, title: str, text: str) -> None:
        with self.path.open("a") as f:
            f.write(f"\n----- {title} -----\n{text}\n")


def has_gpu() -> bool:
    return (
        shutil.which("nvidia-smi") is not None
        and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    )


def gpu_name() -> str | None:
    if not has_gpu():
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def versions() -> dict:
    """Versions of what the run imports, wherever they were installed from."""
    import importlib.metadata

    out = {}
    for name in ("jax", "jaxlib", "keras", "bentoml", "numpy", "pillow", "fastapi", "scikit-image"):
        try:
            dist = importlib.metadata.distribution(name)
            out[name] = f"{dist.version} ({Path(str(dist.locate_file(''))).as_posix()})"
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def model_speed(precision: str, args, env: dict, work: Path, log: Log, save: bool) -> dict:
    """bench.gpu_model in a child process (its GPU memory goes when it exits)."""
    out = work / f"model-{precision}.json"
    cmd = [sys.executable, "-m", "bench.gpu_model", "--precision", precision, "--size", str(args.size),
           "--batches", ",".join(map(str, args.batches)), "--seconds", str(args.model_seconds), "--out", str(out),
           *(["--save"] if save else [])]  # fmt: skip
    log(f"in-process model speed, {precision}: {' '.join(cmd[1:])}")
    child = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in child.stdout:  # progress lines as they come; the rest (warnings) kept
        lines.append(line.rstrip())
        if line.startswith(" "):
            log(line.strip())
    if child.wait():
        log.append(f"bench.gpu_model {precision} output", "\n".join(lines[-80:]))
        raise RuntimeError(f"bench.gpu_model {precision} failed: {' / '.join(lines[-5:])}")
    return json.loads(out.read_text())


def stage_times(jpegs: list[bytes], size: int) -> dict:
    """Median ms per image in this process, with the front's functions: decode; resize
    the first time an input size is seen; resize again at a size already seen."""
    import numpy as np

    from imgcls.images import decode_image, prepare_image

    prepare_image(np.zeros((8, 8, 3), np.uint8), (size, size))  # first-call set-up, untimed
    pixels = [decode_image(data) for data in jpegs]
    n = len(jpegs)
    out = {"decode_ms": harness.timed(lambda i: decode_image(jpegs[i]), n, warm=0).median_ms}
    for key in ("resize_first_ms", "resize_ms"):  # the second pass meets every size again
        out[key] = harness.timed(lambda i: prepare_image(pixels[i], (size, size)), n, warm=0).median_ms
    return out


def split(concurrency: int, parts: int) -> list[int]:
    """`concurrency` users over at most `parts` processes, as evenly as possible."""
    parts = max(1, min(parts, concurrency))
    return [concurrency // parts + (i < concurrency % parts) for i in range(parts)]


def drive_level(load: loadgen.Http, concurrency: int, seconds: float, procs: int, on_start=None) -> dict:
    """A level from several Locust children at once (a process is one core); images/s,
    percentiles, their CPU seconds. `on_start()` runs once all are ready, just before."""
    with contextlib.ExitStack() as stack:
        shares = split(concurrency, procs)
        children = [stack.enter_context(loadgen.Locust(load, c, duration_s=seconds)) for c in shares]
        if on_start:
            on_start()
        for child in children:
            child.go()
        runs = [child.wait() for child in children]
    wall = max(run.ended for run in runs) - min(run.started for run in runs)
    row = {"concurrency": concurrency, "client_procs": len(runs)}
    row |= loadgen.summarize([r for run in runs for r in run.records], wall)
    return row | {"client_cpu_s": sum(run.client_cpu_s for run in runs)}


def warm_up(load: loadgen.Http, args, log: Log) -> None:
    """Every padded batch shape (1, 2, 4, ... up to the max batch) and every front's
    resize of every JPEG size, before anything is timed."""
    concurrency = 1
    while concurrency <= 2 * args.max_batch_size:
        row = drive_level(load, concurrency, args.warm_seconds, args.client_procs)
        log(f"  warm-up c={concurrency}: {row['images_per_s']:.1f} images/s, {row['errors']} errors")
        concurrency *= 2


def bench_service(
    tag: str, precision: str, jpegs, args, env: dict, work: Path, gpu: GpuSampler, log: Log
) -> list[dict]:
    """Warm-up, then each concurrency level against the real service; one row each."""
    from bench.servers import imgcls_server, server_side, service_probe

    server_log = work / f"service-{precision}.log"
    server = imgcls_server(
        server_log, env=env, timeout_s=args.ready_timeout_s, source="bentoml", model_name=NAME, bento_tag=tag,
        poll_interval_s=0, batching=True, max_batch_size=args.max_batch_size, max_latency_ms=args.max_latency_ms,
        gpu=args.gpu or None, front_workers=args.front_workers,
    )  # fmt: skip
    log(f"service {precision}: {args.front_workers} fronts, max batch {args.max_batch_size}, gpu={args.gpu}")
    t0 = time.perf_counter()
    rows = []
    try:
        with (
            server as srv,
            loadgen.probe_client() as probe_client,
        ):  # fmt: skip
            log(f"  ready in {time.perf_counter() - t0:.0f} s")
            load = loadgen.predict_load(srv.url, work / "load", jpegs, max(60.0, 4 * args.level_seconds))
            warm_up(load, args, log)
            cpu, probe = sampling.cpu_counter(srv.pid), service_probe(probe_client, srv.url, server_log)
            for concurrency in args.concurrency:
                rows.append(measure_level(load, concurrency, args, cpu, probe, gpu))
                rows[-1] |= {"precision": precision}
                log(f"  c={concurrency}: {rows[-1]['images_per_s']:.1f} images/s, p99 {rows[-1]['p99_ms']} ms, "
                    f"{rows[-1]['errors']} errors, GPU {rows[-1].get('gpu_util_pct', '-')} %")  # fmt: skip
                rows[-1]["server"] = server_side(*rows[-1].pop("_probes"))
    finally:
        if server_log.exists():
            log.append(
                f"service {precision} log (last 150 lines)",
                "\n".join(server_log.read_text(errors="replace").splitlines()[-150:]),
            )
    return rows


def measure_level(load: loadgen.Http, concurrency, args, cpu, probe, gpu: GpuSampler) -> dict:
    """One timed level: the load, CPU per image of each process role, GPU use."""
    before: dict = {}

    def on_start() -> None:
        before.update(cpu=cpu(), probe=probe(), start=time.perf_counter())

    row = drive_level(load, concurrency, args.level_seconds, args.client_procs, on_start)
    end, after_cpu = time.perf_counter(), cpu()
    time.sleep(0.5)  # let the server flush its access log
    per_image = sampling.cpu_per_image(before["cpu"], after_cpu, row["requests"])
    per_image["client"] = 1000 * row["client_cpu_s"] / row["requests"] if row["requests"] else None
    row |= {"cpu_ms_per_image": per_image, "_probes": (before["probe"], probe())}
    return row | gpu.window(before["start"], end)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cores = os.cpu_count() or 2
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU proof: ResNet50 at 64 px, batches up to 32, short levels (~5 min on 2 cores)",
    )
    p.add_argument("--size", type=int, help="model input size (224; --quick 64)")
    p.add_argument("--concurrency", default="1,32,128", help="service levels (1,32,128)")
    p.add_argument("--batches", help="in-process batch sizes (1,32,128; --quick 1,32)")
    p.add_argument("--precisions", default="float32,bfloat16", help="in-process precisions")
    p.add_argument(
        "--serve-precisions", help="precisions served (float32,bfloat16 on a GPU; float32 otherwise)"
    )
    p.add_argument("--level-seconds", type=float, help="seconds per timed level (10; --quick 6)")
    p.add_argument("--warm-seconds", type=float, help="seconds per warm-up level (2; --quick 1)")
    p.add_argument(
        "--model-seconds", type=float, help="timed seconds per in-process batch size (5; --quick 2)"
    )
    p.add_argument("--max-batch-size", type=int, help="service's largest adaptive batch (128; --quick 32)")
    p.add_argument("--max-latency-ms", type=int, default=10_000, help="service's batching deadline (10000)")
    p.add_argument(
        "--client-procs", type=int, default=max(1, cores // CLIENT_SHARE), help="load-generator processes"
    )
    p.add_argument(
        "--front-workers",
        type=int,
        help=f"HTTP front processes (cores - clients - 2, at least 1: {cores} cores here)",
    )
    p.add_argument("--ready-timeout-s", type=float, default=240, help="wait for /readyz (240 s)")
    p.add_argument(
        "--budget-s", type=float, default=450, help="skip a served precision that would end past this (450 s)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or ROOT / "gpu-out"),
        help="results folder ($OUT)",
    )
    p.add_argument(
        "--shared", type=Path, default=harness.SHARED, help="../shared (photos without scikit-image)"
    )
    args = p.parse_args(argv)
    quick = args.quick
    args.size = args.size or (64 if quick else 224)
    args.level_seconds = args.level_seconds or (6 if quick else 10)
    args.warm_seconds = args.warm_seconds or (1 if quick else 2)
    args.model_seconds = args.model_seconds or (2 if quick else 5)
    args.max_batch_size = args.max_batch_size or (32 if quick else 128)
    args.batches = args.batches or ("1,32" if quick else "1,32,128")
    args.front_workers = args.front_workers or max(1, cores - args.client_procs - 2)
    args.gpu = has_gpu()
    args.serve_precisions = args.serve_precisions or (
        "float32,bfloat16" if args.gpu and not quick else "float32"
    )
    for name in ("concurrency", "batches"):
        setattr(args, name, [int(x) for x in getattr(args, name).split(",") if x.strip()])
    for name in ("precisions", "serve_precisions"):
        setattr(args, name, [x.strip() for x in getattr(args, name).split(",") if x.strip()])
    return args


def child_env(work: Path) -> dict:
    """The environment of the model children and the service: this one, before this
    process put itself on the CPU, plus MODEL_ENV and a shared JAX compilation cache."""
    env = {**os.environ, **MODEL_ENV, "BENTOML_HOME": str(work / "bentoml")}
    env["JAX_COMPILATION_CACHE_DIR"] = str(work / "jax-cache")
    return env


def attempt(results: dict, what: str, log: Log, step):
    """Run one step; a failure is logged and listed in the report, and the run goes on
    (a failed bfloat16 step must not cost the float32 figures)."""
    try:
        return step()
    except Exception as exc:  # noqa: BLE001 - reported, the next step runs
        log(f"FAILED {what}: {type(exc).__name__}: {exc}")
        results.setdefault("failures", []).append(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
        return None


def save(results: dict, out: Path, log: Log) -> str:
    """gpu_bench.json and gpu_bench.md as they stand: after every step, so a run cut
    short by the device's time limit still brings its figures back."""
    results["seconds"] = time.perf_counter() - log.start
    (out / "gpu_bench.json").write_text(json.dumps(results, indent=1, default=str))
    try:
        table = render(results)
    except (KeyError, TypeError, ValueError) as exc:  # a run that failed before its first figures
        table = f"# GPU benchmark: no table ({type(exc).__name__}: {exc})\n\n" + "\n".join(
            results.get("failures", [])
        )
    (out / "gpu_bench.md").write_text(table)
    return table


def run(args, work: Path, log: Log, results: dict) -> None:
    """Everything the report needs, in order: machine, model speeds, stages, service."""
    env = child_env(work)
    os.environ["JAX_PLATFORMS"] = "cpu"  # this process and its clients never touch the GPU
    results["machine"] = {"gpu": gpu_name(), "cpu": cpu_name(), "cores": os.cpu_count(),
                          "python": sys.version.split()[0], "versions": versions()}  # fmt: skip
    results["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "shared")}
    log(f"machine: {json.dumps(results['machine'])}")
    log(f"settings: {json.dumps(results['settings'], default=str)}")
    for p in args.precisions:
        speed = attempt(results, f"model {p}", log,
                        lambda p=p: model_speed(p, args, env, work, log, save=p in args.serve_precisions))  # fmt: skip
        results["model"] += [speed] if speed else []
        save(results, args.out, log)
    jpegs, _sizes, source = varied_jpegs(args.shared, DISTINCT_JPEGS)
    results["images"] = (
        f"{len(jpegs)} JPEGs, mean {sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KiB: {source}"
    )
    log(f"images: {results['images']}")
    results["stages"] = stage_times(jpegs, args.size)
    log(f"stages in one process: {json.dumps(results['stages'])}")
    save(results, args.out, log)
    tags = {m["precision"]: m["bento_tag"] for m in results["model"] if m.get("bento_tag")}
    with GpuSampler() as gpu:
        last_s = 0.0  # how long the last served precision took: the next one's estimate
        for precision in [p for p in args.serve_precisions if p in tags]:
            if time.perf_counter() - log.start + last_s > args.budget_s:
                log(f"service {precision}: skipped, it would end past the {args.budget_s:.0f} s budget")
                continue
            t0 = time.perf_counter()
            rows = attempt(results, f"service {precision}", log,
                           lambda p=precision: bench_service(tags[p], p, jpegs, args, env, work, gpu, log))  # fmt: skip
            results["service"] += rows or []
            last_s = time.perf_counter() - t0
            save(results, args.out, log)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark in a temporary BentoML home; write gpu_bench.{md,log,json} to --out.
    Exit 1 if any step failed (the report lists which), 0 otherwise."""
    quiet_environment()
    os.environ.setdefault("KERAS_BACKEND", "jax")
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "gpu_bench.log")
    results: dict = {"model": [], "service": [], "images": "-", "stages": {}}
    with tempfile.TemporaryDirectory(prefix="imgcls-gpu-bench-") as tmp:
        attempt(results, "run", log, lambda: run(args, Path(tmp), log, results))
    table = save(results, args.out, log)
    log.append("table", table)
    print(table)
    log(f"done in {results['seconds']:.0f} s: {args.out}/gpu_bench.md, gpu_bench.log, gpu_bench.json")
    return 1 if results.get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
