"""Shared helpers of the registry, pipeline and MLflow UI tests: tiny data, stores, servers.

Tests import what they need from here (the lead owns conftest.py). Every store is SQLite
(or a real `mlflow server`) inside pytest's temporary folders.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"circle": (220, 40, 40), "square": (40, 200, 60), "stripes": (40, 60, 220)}
# Quiet, offline child processes.
CHILD_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}


def write_dataset(
    root: Path, classes: dict[str, tuple[int, int, int]] = COLOURS, per_class: int = 12, size: int = 32
) -> Path:
    """`per_class` PNGs per class: a coloured square on grey, jittered; easy to learn."""
    rng = np.random.default_rng(0)
    for name, colour in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = np.full((size, size, 3), 200.0) + rng.normal(0, 10, (size, size, 3))
            x, y = rng.integers(2, size // 2, 2)
            image[y : y + size // 2, x : x + size // 2] = colour
            Image.fromarray(np.clip(image, 0, 255).astype("uint8")).save(root / name / f"{i}.png")
    return root


def quick_config(data: Path, **overrides):
    """A small, fast, learnable training config: simple CNN, 32x32, no augmentation."""
    from training.config import load_config

    values = {
        "backbone": "simple_cnn",
        "image_size": 32,
        "epochs": 6,
        "batch_size": 8,
        "augment.enabled": False,
    }
    return load_config(None, data=data, **(values | overrides))


def weak_overrides() -> dict:
    """A deliberately bad config: one epoch at a learning rate too small to learn anything."""
    return {"epochs": 1, "learning_rate": 1e-7}


def tracking_settings(folder: Path, uri: str | None = None):
    """TrackingSettings with the home in `folder` and an SQLite store there (or `uri`)."""
    from imgcls.settings import TrackingSettings

    # By alias: TrackingSettings does not accept its field name `tracking_uri` (no populate_by_name).
    return TrackingSettings(home=folder / "home", tracking_uri=uri or f"sqlite:///{folder}/mlflow.db")


def registry_settings(**values):
    """RegistrySettings with a fresh model name, so tests sharing a store never meet."""
    from registry.settings import RegistrySettings

    values.setdefault("model_name", f"clf-{uuid.uuid4().hex[:8]}")
    return RegistrySettings(**values)


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float = 90) -> None:
    """Poll `url` until it answers 200; fail early if the process died."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode}: {process.stdout.read() if process.stdout else ''}"
            )
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


def start_imgcls(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start `imgcls ARGS` as a child process with `env` added; output goes to `log_path`."""
    full_env = os.environ | CHILD_ENV | env
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "imgcls.cli", *args],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
            start_new_session=True,
        )


def stop(process: subprocess.Popen) -> None:
    """Stop a child started by `start_imgcls` and everything it started (its session)."""
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def chromium() -> str | None:
    """Debian's chromium, or None (browser tests skip)."""
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")
