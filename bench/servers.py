"""The servers a serving benchmark measures, and what it reads from them besides the
answers: the service's access log and batching counters, full probability vectors.

Each server is an imgcls.processes.ServerProcess on a free loopback port: started in its
own session, waited for, its group stopped when the `with` block ends.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from bench.cases import ALIAS, CLASSES, Case, tracking_settings, untrained_model
from bench.harness import ROOT
from imgcls.processes import HOST, QUIET_ENV, ServerProcess, free_port

# BentoML loads ResNet50 and warms it before /readyz answers: minutes on 2 busy cores.
READY_TIMEOUT_S = 240


def _server(
    cmd: list[str], env: dict[str, str], ready_path: str, port: int, log: Path, cwd: Path = ROOT
) -> ServerProcess:
    """`cmd` run from the checkout (or `cwd`), ready when `ready_path` answers 200; the port
    is checked after the stop."""
    ready = f"http://{HOST}:{port}{ready_path}"
    return ServerProcess(cmd, ready, log, env=env, cwd=cwd, port=port, timeout_s=READY_TIMEOUT_S)


def bento_model(work: Path, name: str, size: int) -> None:
    """An untrained simple_cnn at `size` x `size`, 3 classes, as `name` version 1 in a
    BentoML store under `work` (no MLflow): for benchmarks where weights do not matter."""
    os.environ["BENTOML_HOME"] = str(work / "bentoml")
    from imgcls.modelcard import ModelCard
    from service.store import save_to_bento_store

    untrained_model("simple_cnn", size, 3).save(work / "model.keras")
    card = ModelCard(class_names=["a", "b", "c"], image_size=(size, size), backbone="simple_cnn",
                     dataset_fingerprint=name)  # fmt: skip
    save_to_bento_store(work / "model.keras", card, name=name, version=1)


def imgcls_server(log: Path, *, cwd: Path = ROOT, env=None, timeout_s: float = READY_TIMEOUT_S, **options):
    """`imgcls serve`'s command on a free port, with the IMGCLS_SERVE_* variables of
    `options` (service.cli.settings_env: those None are left out), in `env` (default: this
    process's) made quiet, run from `cwd`."""
    from service.cli import serve_command, settings_env

    port = free_port()
    env = {**(os.environ if env is None else env), **QUIET_ENV}
    env |= settings_env(argparse.Namespace(**options, host=HOST, port=port))
    ready = f"http://{HOST}:{port}/readyz"
    return ServerProcess(
        serve_command(HOST, port), ready, log, env=env, cwd=cwd, port=port, timeout_s=timeout_s
    )


def bento_server(work: Path, name: str, log: Path, cwd: Path = ROOT, **settings) -> ServerProcess:
    """`imgcls serve` of `name` from the BentoML store under `work` (`bento_model`), not
    following, with the service settings `settings`, run from `cwd`."""
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml")}
    return imgcls_server(
        log, cwd=cwd, env=env, source="bentoml", model_name=name, poll_interval_s=0, **settings
    )


# Way of serving -> its `imgcls serve` options beside the benchmark's (issue 20: the default,
# the compiled f32 build, today's Keras path; `--one-process`; the default service of
# another checkout, `--base-tree`: a change measured against its base in the same rounds).
SERVICE_OPTIONS = {
    "imgcls": {},
    "imgcls-base": {},
    "imgcls-f32": {"precision": "f32"},
    "imgcls-keras": {"runtime": "keras"},
    "imgcls-1p": {"one_process": True},
}


def service_server(case: Case, batching: bool, args, log: Path, name: str = "imgcls") -> ServerProcess:
    """`imgcls serve` of the case's exact tag (source=bentoml) with the options of `name`
    (SERVICE_OPTIONS; `--one-process`: one front worker, the model in it); builds kept in
    `args.cache_dir` (if set: the benchmark's own folder)."""
    own, env, cwd = SERVICE_OPTIONS[name], dict(os.environ), ROOT
    if name != "imgcls":
        env["BENTOML_HOME"] = str(_own_bentoml_home(Path(env["BENTOML_HOME"]), name))
    if name == "imgcls-base":
        cwd = Path(args.base_tree).resolve()
        env["PYTHONPATH"] = os.pathsep.join([str(cwd), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return imgcls_server(
        log, cwd=cwd, env=env, source="bentoml", model_name=case.name, bento_tag=case.bento_tag, batching=batching,
        max_batch_size=args.max_batch_size, max_latency_ms=args.max_latency_ms,
        front_workers=1 if own.get("one_process") else args.front_workers, one_process=own.get("one_process"),
        runtime=own.get("runtime"), precision=own.get("precision"), cache_dir=getattr(args, "cache_dir", None),
        max_concurrent_requests=getattr(args, "max_concurrent_requests", None),
    )  # fmt: skip


def _own_bentoml_home(home: Path, name: str) -> Path:
    """A BentoML home beside `home` that shares its model store: every `bentoml serve`
    empties its home's prometheus folder when it starts, so two servers side by side
    need a home each, or the second wipes the first's metrics."""
    own = home.parent / f"{home.name}-{name}"
    own.mkdir(exist_ok=True)
    if not (own / "models").exists():
        (own / "models").symlink_to(home / "models", target_is_directory=True)
    return own


def following_server(case: Case, args, log: Path, work: Path) -> ServerProcess:
    """`imgcls serve --source mlflow --poll-interval S` on the case's registered model: it
    follows `models:/<name>@champion` of the temporary store in `work`."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_settings(work).tracking_uri}
    return imgcls_server(log, env=env, source="mlflow", model_name=case.name, alias=ALIAS,
                         poll_interval_s=args.poll_interval, cache_dir=work / "serve-cache",
                         front_workers=args.front_workers, model_workers=getattr(args, "model_workers", 1))  # fmt: skip


def mlflow_server(case: Case, args: argparse.Namespace, work: Path) -> ServerProcess:
    """`mlflow models serve` on models:/<name>@champion, in this environment."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{case.name}@{ALIAS}"]
    cmd += ["--env-manager", "local", "-h", HOST, "-p", str(port)]
    env = {**os.environ, **QUIET_ENV, "MLFLOW_TRACKING_URI": tracking_settings(work).tracking_uri}
    # MLflow starts `uvicorn` by name: this environment's, also when it is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return _server(cmd, env, "/ping", port, args.log_dir / f"{case.key}-mlflow.log")


# Peer name -> its server module (bench/peers/) and what computes its answers: the `.keras`
# file, as the peers' users serve it, or its OpenVINO build in f32 (issue 20's like for like).
PEERS = {
    "litserve": ("bench.peers.litserve_app", "keras"),
    "litserve-ov": ("bench.peers.litserve_app", "openvino"),
    "ray": ("bench.peers.ray_app", "keras"),
}
PEER_PRECISION = "f32"


def peer_server(kind: str, case: Case, log: Path) -> ServerProcess:
    """A peer (LitServe or Ray Serve) serving the case's `.keras` file (or its OpenVINO
    build) with dynamic batching (bench/peers/); ready when its /health answers."""
    port = free_port()
    module, runtime = PEERS[kind]
    cmd = [sys.executable, "-m", module, "--model", str(case.keras_file), "--size", str(case.size)]
    cmd += ["--classes", ",".join(CLASSES), "--host", HOST, "--port", str(port)]
    cmd += ["--runtime", runtime, "--precision", PEER_PRECISION]
    env = {**os.environ, **QUIET_ENV, "RAY_USAGE_STATS_ENABLED": "0"}  # no usage report from Ray
    return _server(cmd, env, "/health", port, log)


def peer_runtime(kind: str) -> dict:
    """What computes a peer's answers, as the service's /metadata "runtime" says it."""
    if kind in PEERS and PEERS[kind][1] == "openvino":
        why = f"the peer's OpenVINO build (--runtime openvino --precision {PEER_PRECISION})"
        return {"name": "openvino", "precision": PEER_PRECISION, "reason": why}
    return {
        "name": "keras",
        "precision": "f32",
        "reason": "the peer calls predict_on_batch on the .keras file",
    }


def service_runtime(client, url: str) -> dict:
    """What the service chose to compute with: /metadata "runtime" (name, precision, reason)."""
    answer = client.get(f"{url}/metadata")
    answer.raise_for_status()
    return answer.json()["runtime"]


# The /metrics sums the probe reads: images per batch, and the time of each forward pass.
PROBED = ("imgcls_batch_size_sum", "imgcls_batch_size_count", "imgcls_forward_seconds_sum",
          "imgcls_forward_seconds_count")  # fmt: skip


def service_probe(client, url: str, log: Path) -> Callable[[], dict]:
    """A snapshot of the service: its log size and batching counters (/metrics)."""

    def probe() -> dict:
        sums = dict.fromkeys(PROBED, 0.0)
        with contextlib.suppress(Exception):  # metrics are a nice-to-have here
            for line in client.get(f"{url}/metrics").text.splitlines():
                # `name{labels} value`, or `name value` without labels
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name in sums:
                    sums[name] += float(line.rsplit(" ", 1)[-1])
        return {"log": log, "offset": log.stat().st_size, "sums": sums}

    return probe


def server_side(before: dict, after: dict) -> dict:
    """Median ms of /predict (front) and /classify (model process) logged between two
    probes, and the mean adaptive batch size and forward pass between them."""
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
    delta = {name: after["sums"][name] - before["sums"][name] for name in PROBED}
    batches, passes = delta["imgcls_batch_size_count"], delta["imgcls_forward_seconds_count"]
    out["mean_batch"] = delta["imgcls_batch_size_sum"] / batches if batches else None
    # The runtime's own time per forward pass, in the serving process (c=1: batch 1).
    out["forward_ms_mean"] = 1000 * delta["imgcls_forward_seconds_sum"] / passes if passes else None
    return out


def mlflow_probabilities(client, url: str, bodies: list[bytes]):
    import numpy as np

    rows = []
    for body in bodies[:4]:
        answer = client.post(f"{url}/invocations", content=body, headers={"Content-Type": "application/json"})
        answer.raise_for_status()
        rows.append(np.asarray(answer.json()["predictions"][0]))
    return np.array(rows)
