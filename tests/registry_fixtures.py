"""Shared helpers of the registry, pipeline and MLflow UI tests: tiny data, stores, servers.

Tests import what they need from here (the lead owns conftest.py). Every store is SQLite
(or a real `mlflow server`) inside pytest's temporary folders.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from imgcls.processes import QUIET_ENV, start

COLOURS = {"circle": (220, 40, 40), "square": (40, 200, 60), "stripes": (40, 60, 220)}


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


def start_imgcls(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start `imgcls ARGS` in a session of its own, quiet, with `env` added; output goes to
    `log_path`. Wait with imgcls.processes.wait_ready, end with imgcls.processes.stop."""
    root = Path(__file__).resolve().parents[1]
    return start([sys.executable, "-m", "imgcls.cli", *args], log_path, os.environ | QUIET_ENV | env, root)


def chromium() -> str | None:
    """Debian's chromium, or None (browser tests skip)."""
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")
