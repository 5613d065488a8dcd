"""Serving benchmark: the service against the model's own limit and `mlflow models serve`.

    python bench/serve_bench.py [--models resnet50,demo] [--concurrency 1,8,32]
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
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "DO_NOT_TRACK": "true",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}
for _key, _value in QUIET_ENV.items():
    os.environ.setdefault(_key, _value)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/serve_bench.py` from a checkout

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# case -> (backbone, input size); the demo model is the course CNN `imgcls demo` trains.
CASES = {"resnet50": ("resnet50", 224), "demo": ("simple_cnn", 32)}
# Requests per concurrency level. ResNet50 at 224 runs ~15-25 images/s on 2 CPU cores:
# 96 requests, and 8 per client at higher levels so the top level runs ~10 s and its
# figure is steady; `mlflow models serve` (~2.5 images/s there) keeps 96.
DEFAULT_REQUESTS = {"resnet50": 96, "demo": 384}
REQUESTS_PER_CLIENT = {"resnet50": 8, "demo": 0}
QUICK_REQUESTS = 48
# Larger than both model inputs, so the service's resize path (and the demo model's
# box-filter shrink) runs as it does on real uploads.
PHOTO_SIZE = (256, 256)
DISTINCT_IMAGES = 32
RAW_BATCHES = (1, 8, 32)
# One front process spends ~5 ms of CPU per request on one core at most: with the demo
# model (0.1 ms per image) it, not the model, would set the pace. Two use both cores.
FRONT_WORKERS = 2
HOST = "127.0.0.1"
ALIAS = "champion"
# Set on SIGTERM/SIGINT: the load threads stop at once instead of finishing their level.
STOPPING = threading.Event()


@dataclass
class Case:
    """A registered benchmark model: its MLflow name/version and BentoML store tag."""

    key: str
    name: str
    size: int
    version: str
    bento_tag: str


# ---------------------------------------------------------------- registered models


def tracking_settings(work: Path):
    """A temporary SQLite MLflow store inside `work` (never the project's .imgcls)."""
    from imgcls.settings import TrackingSettings

    return TrackingSettings(
        home=work, tracking_uri=f"sqlite:///{work}/mlflow.db", experiment_name="serve-bench"
    )


def build_case_model(key: str, work: Path):
    """The untrained classifier of a case, built as training builds it (augment off)."""
    from training.config import load_config
    from training.model import build_model

    backbone, size = CASES[key]
    config = load_config(
        None, data=work, backbone=backbone, weights="none", image_size=size, **{"augment.enabled": False}
    )
    return build_model(config, len(CLASSES))


def register_case(key: str, work: Path) -> Case:
    """Log, register, alias `champion` and copy into the BentoML store one case's model."""
    import mlflow
    import numpy as np

    from imgcls.modelcard import ModelCard
    from training.tracking import log_keras_model, tracked_run

    backbone, size = CASES[key]
    card = ModelCard(
        class_names=CLASSES, image_size=(size, size), backbone=backbone, dataset_fingerprint="serve-bench"
    )
    model = build_case_model(key, work)
    example = np.zeros((1, size, size, 3), np.float32)
    with tracked_run(tracking_settings(work), run_name=f"serve-bench-{key}"):
        uri = log_keras_model(model, card, example)
    name = f"serve-bench-{key}"
    version = str(mlflow.register_model(uri, name).version)
    mlflow.MlflowClient().set_registered_model_alias(name, ALIAS, version)
    return Case(key, name, size, version, bento_copy(name, version, card, work))


def bento_copy(name: str, version: str, card, work: Path) -> str:
    """Save the registered version's own `.keras` file into the BentoML store; its tag."""
    import mlflow

    from service.store import ALIAS_LABEL, REGISTERED_LABEL, save_to_bento_store

    dest = Path(tempfile.mkdtemp(prefix="download-", dir=work))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=dest))
    keras_file = next(iter(sorted(local.rglob("*.keras"))))
    labels = {REGISTERED_LABEL: name, ALIAS_LABEL: ALIAS}
    return save_to_bento_store(keras_file, card, name=name, version=version, extra_labels=labels)


# ---------------------------------------------------------------- images


def photo_jpegs(shared: Path, count: int) -> tuple[list[bytes], str]:
    """`count` JPEG files at PHOTO_SIZE: CIFAR-10 photos if ../shared has them, else made."""
    archive = shared / "data/cifar10-small.tar.gz"
    if archive.is_file():
        return [_upscaled_jpeg(data) for data in _cifar_jpegs(archive, count)], f"{archive.name}, upscaled"
    return [_generated_jpeg(seed) for seed in range(count)], "generated (no ../shared data)"


def _cifar_jpegs(archive: Path, count: int) -> list[bytes]:
    """The first JPEG of each class in turn, until `count` (a mix of classes)."""
    by_class: dict[str, list[tarfile.TarInfo]] = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and member.name.endswith(".jpg") and len(parts) >= 3:
                by_class.setdefault(parts[-2], []).append(member)
        members = [m for group in itertools.zip_longest(*by_class.values()) for m in group if m]
        return [tar.extractfile(m).read() for m in members[:count]]


def _upscaled_jpeg(data: bytes) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    with Image.open(io.BytesIO(data)) as img:
        img.convert("RGB").resize(PHOTO_SIZE, Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


def _generated_jpeg(seed: int) -> bytes:
    """A smooth photo-like image: colour gradients, a few blobs, sensor-like noise."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = PHOTO_SIZE
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = rng.uniform(0, 255, 3) * (1 - yy[..., None]) + rng.uniform(0, 255, 3) * xx[..., None]
    for _ in range(4):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        img[mask] = rng.uniform(0, 255, 3)
    img = np.clip(img / 2 + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, "JPEG", quality=90)
    return out.getvalue()


# ---------------------------------------------------------------- load generator


def percentiles(latencies_ms: list[float]) -> dict[str, float | None]:
    import numpy as np

    if not latencies_ms:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(latencies_ms, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def run_level(send: Callable[[int], None], requests: int, concurrency: int, cap_s: float) -> dict:
    """`requests` calls of `send(i)` from `concurrency` threads, stopped at `cap_s` seconds.

    Latency is per call, client side, until the whole answer is read; images/s counts
    answered calls over the level's wall time. Failed calls are counted, not timed.
    """
    latencies: list[float] = []
    errors: list[str] = []
    counter, lock = itertools.count(), threading.Lock()
    deadline = time.monotonic() + cap_s

    def worker() -> None:
        while time.monotonic() < deadline and not STOPPING.is_set():
            with lock:
                i = next(counter)
            if i >= requests:
                return
            start = time.perf_counter()
            try:
                send(i)
            except Exception as exc:  # noqa: BLE001 - counted and reported, the level goes on
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            latencies.append((time.perf_counter() - start) * 1000)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "capped": len(latencies) + len(errors) < requests,
        "seconds": wall,
        "images_per_s": len(latencies) / wall,
        **percentiles(latencies),
    }


def http_client(concurrency: int, timeout_s: float):
    """One pooled client for every thread; trust_env=False keeps loopback off any proxy.

    A request times out with its level's cap, so no level runs past twice its cap.
    """
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.Client(limits=limits, timeout=timeout_s, trust_env=False)


def service_sender(client, url: str, jpegs: list[bytes]) -> Callable[[int], None]:
    """POST /predict with the i-th JPEG as multipart field `image`."""

    def send(i: int) -> None:
        answer = client.post(
            f"{url}/predict", files={"image": (f"{i}.jpg", jpegs[i % len(jpegs)], "image/jpeg")}
        )
        if answer.status_code != 200 or not answer.json().get("predictions"):
            raise RuntimeError(f"HTTP {answer.status_code}: {answer.text[:150]}")

    return send


def mlflow_sender(client, url: str, bodies: list[bytes]) -> Callable[[int], None]:
    """POST /invocations with the i-th pre-encoded {"inputs": [[[[...]]]]} JSON body."""

    def send(i: int) -> None:
        answer = client.post(
            f"{url}/invocations",
            content=bodies[i % len(bodies)],
            headers={"Content-Type": "application/json"},
        )
        if answer.status_code != 200:
            raise RuntimeError(f"HTTP {answer.status_code}: {answer.text[:150]}")

    return send


def run_levels(send, levels, requests, cap_s: float, warm: int, probe=None, cpu=None) -> list[dict]:
    """A warm-up burst at the top level (not timed), then each level in turn.

    `requests(concurrency)` is the level's request count. `probe()`, for the service,
    reads its access-log offset and batch counters; each level then also gets the
    server-side times and the mean adaptive batch size. `cpu()` gives CPU seconds per
    process group (see `cpu_counter`); each level gets CPU ms per answered image.
    """
    run_level(send, warm, max(levels), cap_s)
    results = []
    for concurrency in levels:
        before = probe() if probe else None
        cpu_before = cpu() if cpu else None
        row = run_level(send, requests(concurrency), concurrency, cap_s) | {"load": os.getloadavg()[0]}
        if cpu:
            row["cpu_ms_per_image"] = cpu_per_image(cpu_before, cpu(), row["requests"])
        if probe:
            time.sleep(0.5)  # let the server flush its access log
            row |= server_side(before, probe())
        results.append(row)
        print(f"    c={concurrency}: {row['images_per_s']:.1f} images/s, {row['errors']} errors", flush=True)
    return results


def cpu_counter(server_pid: int) -> Callable[[], dict[str, float]]:
    """CPU seconds so far of this process (the load generator) and of the server's
    processes, grouped: BentoML's model worker, its HTTP front worker, the rest."""
    import resource

    import psutil

    root = psutil.Process(server_pid)

    def group(proc) -> str:
        line = " ".join(proc.cmdline())
        if "_bentoml_impl.worker" not in line:
            return "server" if proc.pid == server_pid or "mlflow" in line or "uvicorn" in line else "other"
        return "model" if "imgcls-model" in line else "front"

    def counts() -> dict[str, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out = {"client": usage.ru_utime + usage.ru_stime}
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                key = group(proc)
                out[key] = out.get(key, 0.0) + times.user + times.system
        return out

    return counts


def cpu_per_image(before: dict[str, float], after: dict[str, float], images: int) -> dict[str, float]:
    """CPU ms per answered image of each process group between two `cpu_counter` reads."""
    if not images:
        return {}
    return {key: 1000 * (after[key] - before.get(key, 0.0)) / images for key in after}


def service_probe(client, url: str, log: Path) -> Callable[[], dict]:
    """A snapshot of the service: its log size and adaptive batching counters (/metrics)."""

    def probe() -> dict:
        sums = {"_sum": 0.0, "_count": 0.0}
        with contextlib.suppress(Exception):  # metrics are a nice-to-have here
            for line in client.get(f"{url}/metrics").text.splitlines():
                if line.startswith("bentoml_service_adaptive_batch_size_"):
                    name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[-1]
                    for suffix in sums:
                        sums[suffix] += float(value) if name.endswith(suffix) else 0
        return {"log": log, "offset": log.stat().st_size, "batches": sums}

    return probe


def server_side(before: dict, after: dict) -> dict:
    """Median ms of /predict (front) and /classify (model process) logged between two
    probes, and the mean adaptive batch size between them."""
    import re

    import numpy as np

    with before["log"].open("rb") as f:
        f.seek(before["offset"])
        text = f.read().decode(errors="replace")
    out: dict = {}
    for path, key in (("/predict", "front_predict_ms_p50"), ("/classify", "model_classify_ms_p50")):
        pattern = rf"path={re.escape(path)},.*?\(status=(\d+),[^)]*\) ([0-9.]+)ms"
        found = [(int(status), float(ms)) for status, ms in re.findall(pattern, text)]
        ok = [ms for status, ms in found if status == 200]
        out[key] = float(np.median(ok)) if ok else None
        out[key.replace("_ms_p50", "_non200")] = sum(status != 200 for status, _ in found)
    batches = after["batches"]["_count"] - before["batches"]["_count"]
    images = after["batches"]["_sum"] - before["batches"]["_sum"]
    out["mean_batch"] = images / batches if batches else None
    return out


# ---------------------------------------------------------------- (a) in process


def raw_predict(case: Case, inputs, requests: Callable[[int], int]) -> tuple[list[dict], object]:
    """(a) `model.predict` and (a') `predict_on_batch` at batch 1, 8, 32; also probabilities."""
    from service.store import load_from_mlflow

    model, _card, _version = load_from_mlflow(f"models:/{case.name}@{ALIAS}")
    calls = in_process_calls(model)
    rows = [
        _raw_batch_level(method, call, inputs, batch, requests(batch))
        for method, call in calls.items()
        for batch in RAW_BATCHES
    ]
    probabilities = model.predict_on_batch(inputs[:4])
    del model, calls
    import keras

    keras.backend.clear_session()
    return rows, probabilities


def in_process_calls(model) -> dict[str, Callable]:
    """(a) `model.predict` with the whole batch as one step, and (a') `predict_on_batch`."""
    return {
        "predict": lambda x: model.predict(x, batch_size=len(x), verbose=0),
        "predict_on_batch": model.predict_on_batch,
    }


def _raw_batch_level(method: str, call, inputs, batch: int, requests: int) -> dict:
    """Images/s and per-call latency of one in-process call at one batch size."""
    import numpy as np

    batches = [np.take(inputs, range(i, i + batch), axis=0, mode="wrap") for i in range(0, requests, batch)]
    call(batches[0])  # trace this shape
    call(batches[0])
    latencies = []
    start, cpu = time.perf_counter(), time.process_time()
    for x in batches:
        t0 = time.perf_counter()
        call(x)
        latencies.append((time.perf_counter() - t0) * 1000)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    images = batch * len(batches)
    row = {"method": method, "batch": batch, "requests": images, "errors": 0, "seconds": wall}
    row |= {"images_per_s": images / wall, "cpu_ms_per_image": {"in-process": 1000 * cpu / images}}
    print(f"    {method} batch={batch}: {row['images_per_s']:.1f} images/s", flush=True)
    return row | percentiles(latencies) | {"load": os.getloadavg()[0]}


def preprocess_ms(jpegs: list[bytes], size: int) -> float:
    """Median ms of imgcls.images.load_image (decode + resize) per JPEG, in this process."""
    import numpy as np

    from imgcls.images import load_image

    times = []
    for data in jpegs:
        t0 = time.perf_counter()
        load_image(data, (size, size))
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


# ---------------------------------------------------------------- servers


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    pid: int


@contextlib.contextmanager
def server(cmd: list[str], env: dict[str, str], ready_path: str, port: int, log: Path) -> Iterator[Server]:
    """Run `cmd` in its own process group until the block ends; yields its URL and pid."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://{HOST}:{port}"
    try:
        wait_ready(f"{url}{ready_path}", proc, log)
        yield Server(url, proc.pid)
    finally:
        stop(proc)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Poll `url` until it answers 200; raise with the log's tail if the server dies."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"not ready in {timeout:.0f}s: {url}\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):  # workers that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)


def service_server(case: Case, batching: bool, args: argparse.Namespace, log: Path):
    """`imgcls serve`'s command and IMGCLS_SERVE_* variables, source=bentoml, exact tag."""
    from service.cli import serve_command, settings_env

    port = free_port()
    options = argparse.Namespace(
        source="bentoml",
        model_name=case.name,
        bento_tag=case.bento_tag,
        batching=batching,
        max_batch_size=args.max_batch_size,
        max_latency_ms=args.max_latency_ms,
        front_workers=args.front_workers,
        host=HOST,
        port=port,
    )
    env = {**os.environ, **QUIET_ENV, **settings_env(options)}
    return server(serve_command(HOST, port), env, "/readyz", port, log)


def mlflow_server(case: Case, args: argparse.Namespace, work: Path):
    """`mlflow models serve` on models:/<name>@champion, in this environment."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{case.name}@{ALIAS}"]
    cmd += ["--env-manager", "local", "-h", HOST, "-p", str(port)]
    env = {**os.environ, **QUIET_ENV, "MLFLOW_TRACKING_URI": tracking_settings(work).tracking_uri}
    # MLflow starts `uvicorn` by name: this environment's, also when it is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return server(cmd, env, "/ping", port, args.log_dir / f"{case.key}-mlflow.log")


# ---------------------------------------------------------------- one case


def service_probabilities(client, url: str, jpegs: list[bytes]):
    """Full probability vectors for the first JPEGs from /predict (top_k = all classes)."""
    import numpy as np

    rows = []
    for data in jpegs[:4]:
        answer = client.post(f"{url}/predict", files={"image": ("p.jpg", data)}, data={"top_k": len(CLASSES)})
        answer.raise_for_status()
        probs = {p["label"]: p["probability"] for p in answer.json()["predictions"]}
        rows.append([probs[c] for c in CLASSES])
    return np.array(rows)


def mlflow_probabilities(client, url: str, bodies: list[bytes]):
    import numpy as np

    rows = []
    for body in bodies[:4]:
        answer = client.post(f"{url}/invocations", content=body, headers={"Content-Type": "application/json"})
        answer.raise_for_status()
        rows.append(np.asarray(answer.json()["predictions"][0]))
    return np.array(rows)


def bench_service(case, jpegs, batching, reference, args) -> tuple[list[dict], float]:
    """(b) or (c): the levels against `bentoml serve`, and the max probability gap to (a)."""
    levels = args.concurrency_levels
    log = args.log_dir / f"{case.key}-service-{'batching' if batching else 'nobatching'}.log"
    with (
        service_server(case, batching, args, log) as srv,
        http_client(max(levels), args.level_timeout) as client,
    ):
        gap = float(abs(service_probabilities(client, srv.url, jpegs) - reference).max())
        send = service_sender(client, srv.url, jpegs)
        probe = service_probe(client, srv.url, log)
        # The warm-up runs every batch size the top level will, so TensorFlow's
        # per-shape set-up (oneDNN primitives, ~50 ms each on ResNet50) is not timed.
        rows = run_levels(
            send, levels, args.requests_for(case.key), args.level_timeout, 4 * max(levels), probe,
            cpu_counter(srv.pid),
        )  # fmt: skip
        return rows, gap


def bench_mlflow(case, bodies, reference, args, work) -> tuple[list[dict], float]:
    """(d): the levels against `mlflow models serve` with client-side decoded JSON tensors."""
    levels = args.concurrency_levels
    with mlflow_server(case, args, work) as srv, http_client(max(levels), args.level_timeout) as client:
        gap = float(abs(mlflow_probabilities(client, srv.url, bodies) - reference).max())
        send = mlflow_sender(client, srv.url, bodies)
        requests = args.requests_for(case.key, mlflow=True)
        return run_levels(
            send, levels, requests, args.level_timeout, min(8, max(levels)), cpu=cpu_counter(srv.pid)
        ), gap


def bench_case(case: Case, jpegs: list[bytes], args: argparse.Namespace, work: Path) -> dict:
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
    out["b"], out["b_max_prob_gap"] = bench_service(case, jpegs, True, reference, args)
    print(f"  (c) service, batching off, {case.key}", flush=True)
    out["c"], out["c_max_prob_gap"] = bench_service(case, jpegs, False, reference, args)
    print(f"  (d) mlflow models serve, {case.key}", flush=True)
    out["d"], out["d_max_prob_gap"] = bench_mlflow(case, bodies, reference, args, work)
    return out


# ---------------------------------------------------------------- report


def best_raw(result: dict, method: str = "predict") -> dict:
    """The fastest in-process row of one method: (a) `predict`, (a') `predict_on_batch`."""
    return max((r for r in result["a"] if r.get("method", "predict_on_batch") == method),
               key=lambda r: r["images_per_s"])  # fmt: skip


def level(rows: list[dict], concurrency: int) -> dict | None:
    return next((r for r in rows if r["concurrency"] == concurrency), None)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


NAMES = {
    "predict": "(a) in-process model.predict",
    "predict_on_batch": "(a') in-process predict_on_batch",
    "b": "(b) service, adaptive batching",
    "c": "(c) service, batching off",
    "d": "(d) mlflow models serve (client decodes)",
}


def table(results: dict) -> str:
    """Markdown: one row per case, model and level; ratios on the (b) rows."""
    lines = [
        "| case | model | concurrency | images/s | p50 ms | p95 ms | p99 ms | b/a | b/a' | b/d |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, result in results.items():
        best = best_raw(result)["images_per_s"]
        strict = best_raw(result, "predict_on_batch")["images_per_s"]
        for case in "abcd":
            for row in result[case]:
                name = NAMES[row.get("method", "predict_on_batch")] if case == "a" else NAMES[case]
                where = f"batch {row['batch']}" if case == "a" else str(row["concurrency"])
                ratios = ["", "", ""]
                if case == "b":
                    d = level(result["d"], row["concurrency"])
                    rate = row["images_per_s"]
                    ratios = [f"{rate / best:.2f}x", f"{rate / strict:.2f}x", _ratio(row, d)]
                flag = " (capped)" if row.get("capped") else ""
                flag += f" ({row['errors']} errors)" if row.get("errors") else ""
                cells = [name, key, where, f"{row['images_per_s']:.1f}{flag}"]
                cells += [_ms(row[p]) for p in ("p50_ms", "p95_ms", "p99_ms")] + ratios
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown(results: dict) -> str:
    """Markdown: client p50 vs the server's own access-log times, and CPU per image by
    process, per service level; CPU per image of (a) and (d) too."""
    groups = ("client", "front", "model", "server")
    lines = [
        "| case | model | concurrency | client p50 ms | front /predict p50 ms | model /classify p50 ms "
        "| mean batch | non-200 | CPU ms/image: " + " / ".join(groups) + " |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, result in results.items():
        for row in result["a"]:
            cpu = row.get("cpu_ms_per_image", {}).get("in-process")
            name = NAMES[row.get("method", "predict_on_batch")].split(" in-process")[0]
            cells = [name, key, f"batch {row['batch']}", *["-"] * 5, f"in process {_ms(cpu)}"]
            lines.append("| " + " | ".join(cells) + " |")
        for case in "bcd":
            for row in result[case]:
                cells = [f"({case})", key, str(row["concurrency"]), _ms(row["p50_ms"])]
                cells += [_ms(row.get("front_predict_ms_p50")), _ms(row.get("model_classify_ms_p50"))]
                cells.append(_ms(row.get("mean_batch")))
                non200 = [row.get(f"{x}_non200") for x in ("front_predict", "model_classify")]
                cells.append("-" if case == "d" else " / ".join(map(str, non200)))
                cpu = row.get("cpu_ms_per_image", {})
                cells.append(" / ".join(_ms(cpu.get(g)) for g in groups))
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(row: dict, other: dict | None) -> str:
    if not other or not other["images_per_s"]:
        return "-"
    return f"{row['images_per_s'] / other['images_per_s']:.2f}x"


def targets(key: str, result: dict, top: int) -> list[tuple[bool | None, str]]:
    """The issue's targets for one model, as (passed, line); None marks a figure that is
    reported beside them but is not one of them."""
    b, c, d = (level(result[x], top) for x in "bcd")
    best = best_raw(result)["images_per_s"]
    strict = best_raw(result, "predict_on_batch")["images_per_s"]
    checks: list[tuple[bool | None, str]] = [
        (
            b["images_per_s"] >= 0.85 * best,
            f"(b) c={top} {b['images_per_s']:.1f}/s >= 0.85x (a) model.predict best {best:.1f}/s "
            f"({b['images_per_s'] / best:.2f}x)",
        ),
        (
            None,
            f"(b) c={top} is {b['images_per_s'] / strict:.2f}x (a') predict_on_batch best {strict:.1f}/s "
            "(stricter than the issue's (a))",
        ),
        (b["images_per_s"] >= 3 * d["images_per_s"], f"(b) c={top} >= 3x (d) {d['images_per_s']:.1f}/s"),
        (b["images_per_s"] > c["images_per_s"], f"(b) c={top} beats (c) {c['images_per_s']:.1f}/s"),
    ]
    b1 = level(result["b"], 1)
    # The model's own latency: the call the service makes, predict_on_batch, at batch 1.
    a1 = next((r for r in result["a"] if r["batch"] == 1 and r.get("method") != "predict"), None)
    if b1 and a1 and b1["p50_ms"] is not None:
        added = b1["p50_ms"] - a1["p50_ms"]
        checks.append(
            (added < 15, f"c=1: service adds {added:.1f} ms to the model's p50 {a1['p50_ms']:.1f} ms (< 15)")
        )
    failed = sum(row["errors"] for x in "bc" for row in result[x])
    checks.append((not failed, f"(b) and (c) answer every request: {failed} failed"))
    return [(ok, f"{key}: {line}") for ok, line in checks]


def machine() -> dict:
    import bentoml
    import keras
    import mlflow

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "system": platform.system(),
        "python": platform.python_version(),
        "keras": f"{keras.__version__} ({keras.backend.backend()})",
        "mlflow": mlflow.__version__,
        "bentoml": bentoml.__version__,
        "load_average_at_start": os.getloadavg()[0],
    }


# ---------------------------------------------------------------- command line


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


def _stop(signum, _frame) -> None:
    """Stop the load threads and unwind: the `finally` blocks stop the servers."""
    STOPPING.set()
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imgcls-serve-bench-") as tmp:
        work = Path(tmp)
        os.environ["BENTOML_HOME"] = str(work / "bentoml")
        os.environ.setdefault("KERAS_HOME", str(work / "keras"))
        args.log_dir = args.logs or work
        args.log_dir.mkdir(parents=True, exist_ok=True)
        jpegs, source = photo_jpegs(args.shared, DISTINCT_IMAGES)
        report: dict = {"machine": machine(), "images": f"{len(jpegs)} JPEGs at {PHOTO_SIZE}: {source}"}
        report["settings"] = {"concurrency": args.concurrency_levels, "level_timeout_s": args.level_timeout}
        results = {}
        for key in args.cases:
            print(f"{key}: registering", flush=True)
            results[key] = bench_case(register_case(key, work), jpegs, args, work)
        report |= {"results": results, "seconds": time.perf_counter() - started}
        report["load_average_at_end"] = os.getloadavg()[0]
    print_report(report, args)


def print_report(report: dict, args: argparse.Namespace) -> None:
    top = max(args.concurrency_levels)
    checks = [c for key, result in report["results"].items() for c in targets(key, result, top)]
    report["targets"] = [{"passed": ok, "check": line} for ok, line in checks if ok is not None]
    report["notes"] = [line for ok, line in checks if ok is None]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    m = report["machine"]
    print(
        f"\nMachine: {m['cpu']}, {m['cores']} cores, keras {m['keras']}, mlflow {m['mlflow']}, bentoml {m['bentoml']}"
    )
    print(
        f"Load average: {m['load_average_at_start']:.1f} at start, {report['load_average_at_end']:.1f} at end"
    )
    print(f"Images: {report['images']}. (d): the client decodes and resizes each JPEG with")
    print("imgcls.images.load_image before timing and sends a JSON tensor (MLflow takes no image upload).\n")
    print(table(report["results"]))
    print("\nWhere the time goes (server times from the service's access log; CPU per answered")
    print("image of the load generator, the service's HTTP front and model processes, MLflow's server):\n")
    print(breakdown(report["results"]))
    print()
    for key, result in report["results"].items():
        gaps = ", ".join(f"{x} {result[f'{x}_max_prob_gap']:.1e}" for x in "bcd")
        print(f"{key}: decode+resize p50 {result['preprocess_ms_p50']:.1f} ms; mlflow body "
              f"{result['mlflow_body_kb']:.0f} KiB; max |p - p(a)|: {gaps}")  # fmt: skip
    for ok, line in checks:
        print(f"{'NOTE' if ok is None else 'PASS' if ok else 'FAIL'} {line}")
    print(f"\n{report['seconds']:.0f} s in all; JSON: {args.out}")


if __name__ == "__main__":
    main()
