"""Shared test set-up: quiet, offline, and every store inside the test's own folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import xdist_groups

# Before anything imports Keras, MLflow or BentoML.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CLASS_COLOURS = {"circle": (220, 40, 40), "square": (40, 200, 60), "stripes": (40, 60, 220)}
XDIST_GROUPS = pytest.StashKey[Path]()  # the controller's file of the workers' xdist groups


def pytest_configure(config):
    """Two pytest-xdist workers (tests/xdist_groups.py): the controller names the file the
    workers write their groups to; on a worker, free_port hands out ports of this worker's
    slot only, so two workers (and the servers they start) never race for a port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    if worker:
        count = os.environ["PYTEST_XDIST_WORKER_COUNT"]
        os.environ["IMGCLS_PORT_SLOT"] = f"{worker.removeprefix('gw')}/{count}"
    elif config.pluginmanager.hasplugin("xdist") and config.getoption("dist", "no") == "loadgroup":
        config.stash[XDIST_GROUPS] = Path(tempfile.mkdtemp(prefix="imgcls-xdist-")) / "groups.json"


def pytest_unconfigure(config):
    if XDIST_GROUPS in config.stash:
        shutil.rmtree(config.stash[XDIST_GROUPS].parent, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    if XDIST_GROUPS in node.config.stash:
        node.workerinput[xdist_groups.GROUPS_FILE_KEY] = str(node.config.stash[XDIST_GROUPS])


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # before pytest-xdist's own loadgroup
def pytest_xdist_make_scheduler(config, log):
    if XDIST_GROUPS in config.stash and config.getvalue("dist") == "loadgroup":
        return xdist_groups.GroupScheduling(config, log, config.stash[XDIST_GROUPS])
    return None


def pytest_collection_modifyitems(config, items):
    """On a worker of `--dist loadgroup`, write each test's xdist group for the controller."""
    groups_file = getattr(config, "workerinput", {}).get(xdist_groups.GROUPS_FILE_KEY)
    if groups_file:
        xdist_groups.write_groups(Path(groups_file), items)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keras, MLflow, BentoML and imgcls write under a per-session (per-worker) temp
    folder, never $HOME or the checkout's .imgcls."""
    home = tmp_path_factory.getbasetemp() / "home"
    monkeypatch.setenv("IMGCLS_HOME", str(home / "imgcls"))
    monkeypatch.setenv("KERAS_HOME", str(home / "keras"))
    monkeypatch.setenv("BENTOML_HOME", str(home / "bentoml"))
    monkeypatch.setenv("IMGCLS_SERVE_CACHE_DIR", str(home / "serve-cache"))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)


def draw_shape(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A learnable RGB image of one class: a coloured circle, square or stripes, jittered."""
    yy, xx = np.mgrid[:size, :size] / size
    cx, cy = rng.uniform(0.35, 0.65, 2)
    if kind == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < 0.07
    elif kind == "square":
        mask = (abs(xx - cx) < 0.22) & (abs(yy - cy) < 0.22)
    else:
        mask = np.sin((xx + yy) * 18 + rng.uniform(0, 3)) > 0
    image = np.full((size, size, 3), 235, dtype=np.float64)
    image[mask] = CLASS_COLOURS[kind]
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_shapes_dataset(root: Path, per_class: int = 12, size: int = 32, seed: int = 0) -> Path:
    """3 classes x `per_class` images: PNG and JPEG mixed, one greyscale, one RGBA."""
    rng = np.random.default_rng(seed)
    for kind in CLASS_COLOURS:
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.fromarray(draw_shape(kind, size, rng))
            if i % 3 == 0:
                image.save(folder / f"{kind}_{i}.jpg", quality=95)
            else:
                image.save(folder / f"{kind}_{i}.png")
    Image.fromarray(draw_shape("circle", size, rng)).convert("L").save(root / "circle" / "grey.png")
    Image.fromarray(draw_shape("square", size, rng)).convert("RGBA").save(root / "square" / "rgba.png")
    return root


@pytest.fixture
def shapes_dir(tmp_path) -> Path:
    """A fresh tiny dataset folder the test may modify."""
    return write_shapes_dataset(tmp_path / "shapes")


@pytest.fixture(scope="session")
def shapes_dir_shared(tmp_path_factory) -> Path:
    """A tiny dataset shared by tests that only read it."""
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A BentoML home holding the tiny model of tests/service_fixtures.py as registry
    version 7, written once per worker (a child process that imports BentoML): the service
    tests give each server a copy (`service_fixtures.copy_store`), not a process each."""
    from tests.service_fixtures import write_tiny_store

    return write_tiny_store(tmp_path_factory.mktemp("tiny_store"))


@pytest.fixture
def tracking(tmp_path):
    """TrackingSettings on a fresh SQLite MLflow store inside tmp_path."""
    from imgcls.settings import TrackingSettings

    return TrackingSettings(home=tmp_path / "imgcls", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")


def quick_config(data: Path, **overrides):
    """A training config small enough for a test: simple CNN, 32x32, few epochs."""
    from training.config import load_config

    values = {"backbone": "simple_cnn", "image_size": 32, "epochs": 3, "batch_size": 8}
    return load_config(None, data=data, **(values | overrides))


def chromium() -> str | None:
    """Path of Debian's chromium, or None (browser tests skip)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_artifacts(client, run_id: str, path: str = "") -> set[str]:
    """Every artifact path of an MLflow run (folders walked)."""
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= run_artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found
