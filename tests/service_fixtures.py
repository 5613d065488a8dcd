"""Helpers for the service tests: a tiny real classifier, real image files, a real server.

Imported by tests/test_service*.py and tests/test_images.py (kept out of conftest.py so
the stages' test helpers do not collide). Servers are started, waited for and stopped by
imgcls.processes.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from imgcls.modelcard import ModelCard
from imgcls.processes import QUIET_ENV, ServerProcess, free_port
from service.cli import serve_command

CLASSES = ["red", "green", "blue"]
SIZE = (32, 32)


def tiny_card() -> ModelCard:
    """The card of `build_tiny_model`."""
    return ModelCard(
        class_names=CLASSES,
        image_size=SIZE,
        backbone="tiny-cnn",
        metrics={"val_accuracy": 1.0},
        dataset_fingerprint="test",
    )


def build_tiny_model():
    """Input(32,32,3) raw pixels -> Rescaling -> Conv2D -> GAP -> Dense softmax, 3 classes.

    The conv kernel is set so a mostly red/green/blue image gets that label: the test
    can then assert on the label a user would expect.
    """
    import keras

    inputs = keras.Input((*SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(x)
    model = keras.Model(inputs, outputs)
    kernel = np.zeros((3, 3, 3, 3), np.float32)
    kernel[1, 1] = np.eye(3) * 2 - 0.5  # channel c excites filter c, inhibits the others
    model.get_layer("conv").set_weights([kernel, np.zeros(3, np.float32)])
    model.get_layer("head").set_weights([np.eye(3, dtype=np.float32) * 6, np.zeros(3, np.float32)])
    return model


def save_tiny_model(folder: Path) -> Path:
    """The tiny model saved as a `.keras` file in `folder`."""
    path = folder / "tiny.keras"
    build_tiny_model().save(path)
    return path


def colour_image(colour: str, size: tuple[int, int] = (48, 40), seed: int = 0) -> np.ndarray:
    """An (h, w, 3) uint8 image dominated by `colour`, with some noise."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, size=(*size, 3)).astype(np.uint8)
    pixels[..., CLASSES.index(colour)] = rng.integers(180, 256, size=size)
    return pixels


def parity_set(size: tuple[int, int] = SIZE, per_colour: int = 20) -> np.ndarray:
    """Parity images (service/compiled.py) a red/green/blue model labels without a near tie."""
    return np.stack([colour_image(c, size, seed=i) for i in range(per_colour) for c in CLASSES])


def log_keras_model(model, card: ModelCard):
    """Log `model` with `card` as the active run's model, as training does; MLflow's ModelInfo.

    The requirements are given (as training gives them): left out, MLflow infers them by
    loading the model in a child process, about 9 s a model on 2 busy cores."""
    import keras
    import mlflow

    requirements = [f"keras=={keras.__version__}", f"numpy=={np.__version__}"]
    return mlflow.keras.log_model(
        model, name="model", metadata=card.to_metadata(), pip_requirements=requirements
    )


def log_parity(model_id: str, images: np.ndarray, folder: Path) -> None:
    """Store `images` as the parity set of an MLflow logged model, as training does."""
    import mlflow

    from imgcls import parity

    path = parity.save(images, folder / parity.PARITY_FILE)
    mlflow.MlflowClient().log_model_artifact(model_id, str(path))


def encode(pixels: np.ndarray, fmt: str, **params) -> bytes:
    """`pixels` encoded by Pillow in `fmt` (PNG, JPEG, GIF...)."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **params)
    return out.getvalue()


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 (h, w, 1|3|4) samples, written by hand (Pillow cannot)."""
    h, w, c = values.shape
    colour_type = {1: 0, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A small PNG whose header announces width x height pixels (a decompression bomb)."""
    row = b"\x00" + bytes(width)
    body = zlib.compress(row * 64, 9)  # only some rows: the header alone must be refused

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def cmyk_jpeg(colour: str) -> bytes:
    """A CMYK JPEG of a `colour` image."""
    out = io.BytesIO()
    Image.fromarray(colour_image(colour)).convert("CMYK").save(out, format="JPEG", quality=95)
    return out.getvalue()


def palette_png_with_transparency(colour: str) -> bytes:
    """A palette (P) PNG with a transparent palette entry."""
    img = Image.fromarray(colour_image(colour)).convert("P", palette=Image.Palette.ADAPTIVE)
    out = io.BytesIO()
    img.save(out, format="PNG", transparency=0)
    return out.getvalue()


def animated_gif(first: str, second: str) -> bytes:
    """A two-frame GIF whose first frame is `first`-coloured."""
    frames = [Image.fromarray(colour_image(c, seed=i)) for i, c in enumerate((first, second))]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return out.getvalue()


def exif_rotated_jpeg(pixels: np.ndarray, orientation: int = 6) -> bytes:
    """A JPEG with an EXIF Orientation tag (pixels stored as given, not rotated)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(pixels, "JPEG", quality=95, exif=exif.tobytes())


def service_env(bentoml_home: Path, **settings: object) -> dict[str, str]:
    """Environment for a `bentoml serve` child: quiet, tmp BENTOML_HOME, IMGCLS_SERVE_*."""
    env = {**os.environ, **QUIET_ENV, "BENTOML_HOME": str(bentoml_home)}
    env.update({f"IMGCLS_SERVE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class Clients:
    """Threads that keep asking /predict and /predict_batch and keep every answer."""

    def __init__(self, url: str, threads: int = 3):
        self.url, self.stop, self.answers, self.failures = url, threading.Event(), [], []
        self.red = encode(colour_image("red"), "PNG")
        self.files = [("images", (f"{c}.png", encode(colour_image(c), "PNG"))) for c in CLASSES]
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _run(self, index: int) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                batch = index % 3 == 2
                try:
                    if batch:
                        response = http.post(f"{self.url}/predict_batch", files=self.files)
                    else:
                        response = http.post(f"{self.url}/predict", files={"image": ("red.png", self.red)})
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")
                else:
                    self.answers.append((time.monotonic(), batch, response.json()))

    def versions_since(self, t: float) -> set[str]:
        return {body["version"] for at, _, body in list(self.answers) if at >= t}

    def wait_for(self, version: str, timeout_s: float = 60) -> float:
        """Seconds until every client answers with `version` (all answers since one moment)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            mark = time.monotonic()
            time.sleep(1.0)
            if self.versions_since(mark) == {version}:
                return time.monotonic() - started
        raise TimeoutError(f"clients never all got version {version}: {self.versions_since(started)}")


def write_tiny_store(home: Path) -> Path:
    """`home`, a BentoML home holding the tiny model as registry version 7 (saved by a child
    process, so this one never imports BentoML's store with another BENTOML_HOME). The
    `tiny_store` fixture writes it once per worker; servers get copies (`copy_store`)."""
    save = (
        "import sys; from imgcls.modelcard import ModelCard; from service.store import "
        "save_to_bento_store as s; "
        "s(sys.argv[1], ModelCard.model_validate_json(sys.argv[2]), 'image-classifier', 7)"
    )
    model_file = save_tiny_model(home)
    card = tiny_card().model_dump_json()
    root = Path(__file__).resolve().parents[1]
    env = service_env(home)
    subprocess.run([sys.executable, "-c", save, str(model_file), card], env=env, check=True, cwd=root)
    return home


def copy_store(store: Path, home: Path) -> Path:
    """`home` (a server's BentoML home) holding a copy of the models of `store` (a BentoML
    home written by `write_tiny_store`): each server's store is its own."""
    shutil.copytree(store / "models", home / "models", dirs_exist_ok=True)
    return home


@contextlib.contextmanager
def tiny_model_server(
    home: Path, store: Path, hooks: dict[str, str] | None = None, **settings: object
) -> Iterator[ServerProcess]:
    """A real `bentoml serve` of the tiny model (a copy of the `tiny_store` fixture's
    BentoML store under `home`: registry version 7), stopped at the end of the block.
    `hooks`: IMGCLS_HOOK_<STEP> values."""
    env = service_env(copy_store(store, home), **settings)
    env.update({f"IMGCLS_HOOK_{step.upper()}": action for step, action in (hooks or {}).items()})
    root = Path(__file__).resolve().parents[1]
    port = free_port()
    cmd = serve_command("127.0.0.1", port)
    ready = f"http://127.0.0.1:{port}/readyz"
    with ServerProcess(cmd, ready, home / "server.log", env=env, cwd=root, port=port, timeout_s=150) as srv:
        yield srv
