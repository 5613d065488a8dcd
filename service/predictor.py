"""The served model: a Keras classifier with its card, shared by tests, CLI and service.

Keras and NumPy only, no TensorFlow import, so it runs on any Keras backend.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np

from imgcls.images import (
    DEFAULT_MAX_PIXELS,
    PREPROCESSING_VERSION,
    decode_preview,
    load_image,
    resize_image,
)
from imgcls.modelcard import ModelCard

from . import gradcam
from .compiled import KERAS, Runtime

logger = logging.getLogger(__name__)


class Prediction(TypedDict):
    """One label of a top-k answer."""

    label: str
    probability: float


def top_k(probabilities: np.ndarray, class_names: list[str], k: int) -> list[Prediction]:
    """The `k` most probable labels of one probability vector, most probable first."""
    order = np.argsort(-np.asarray(probabilities), kind="stable")[: max(1, k)]
    return [Prediction(label=class_names[i], probability=float(probabilities[i])) for i in order]


@dataclass
class Predictor:
    """A loaded model, its card, and where it came from (registered name and version)."""

    model: Any
    card: ModelCard
    version: str
    name: str = "image-classifier"
    max_pixels: int = DEFAULT_MAX_PIXELS
    # The verified compiled build that computes probabilities (service/compiled.py), or
    # None: Keras does. The Keras model stays loaded for Grad-CAM and as the fallback.
    engine: Any = field(default=None, repr=False)
    runtime: Runtime = KERAS
    _split: gradcam.ConvSplit | None = field(default=None, init=False, repr=False)

    def preprocess(self, data: bytes) -> np.ndarray:
        """Image bytes to this model's (H, W, 3) float32 input; raises ImageDecodeError."""
        return load_image(data, tuple(self.card.image_size), max_pixels=self.max_pixels)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Softmax outputs (N, classes) for an (N, H, W, 3) float32 batch."""
        batch = np.asarray(batch, dtype=np.float32)
        if len(batch) == 0:
            return np.zeros((0, len(self.card.class_names)), np.float32)
        if self.engine is not None:
            return self.engine(batch)
        padded = _pad_batch(batch)
        out = self.model.predict_on_batch(padded)
        return np.asarray(out, dtype=np.float32)[: len(batch)]

    def predict(self, images: list[np.ndarray], k: int = 3) -> list[list[Prediction]]:
        """Top-k labels for each preprocessed image, in order."""
        if not images:
            return []
        probs = self.probabilities(np.stack(images))
        return [top_k(row, self.card.class_names, k) for row in probs]

    def predict_bytes(self, blobs: list[bytes], k: int = 3) -> list[list[Prediction]]:
        """Top-k labels for each encoded image; raises ImageDecodeError on the first bad one."""
        return self.predict([self.preprocess(data) for data in blobs], k)

    def heatmap(self, x: np.ndarray, class_index: int | None = None) -> np.ndarray:
        """Grad-CAM (h, w) in [0, 1] of one model input; default class: the predicted one."""
        if class_index is None:
            class_index = int(np.argmax(self.probabilities(x[None])[0]))
        if self._split is None:
            self._split = gradcam.split_at_last_conv(self.model)
        return gradcam.gradcam_heatmap(self._split, x, class_index)

    def explain(self, image: bytes | np.ndarray, class_index: int | None = None) -> bytes:
        """Grad-CAM overlay (PNG bytes) of an encoded image or its decoded uint8 pixels
        (an encoded one is drawn on a preview of at most 1024 px, see decode_preview)."""
        size = tuple(self.card.image_size)
        if isinstance(image, bytes):
            x, pixels = self.preprocess(image), decode_preview(image, max_pixels=self.max_pixels)
        else:
            x, pixels = resize_image(image, size), image
        return gradcam.overlay_png(pixels, self.heatmap(x, class_index))

    def warm_up(self) -> None:
        """Predictions on blank batches of every size class the service will run, so no
        request pays for tracing: on TensorFlow a batch of 1 and one of 2 (from the second
        shape on, Keras traces a function of any batch size); on JAX each padded size."""
        h, w = self.card.image_size
        for size in _warm_batch_sizes():
            self.probabilities(np.zeros((size, h, w, 3), np.float32))
        logger.info("model %s v%s is warm", self.name, self.version)
        if self.card.preprocessing != PREPROCESSING_VERSION:
            logger.info(
                "model %s v%s was trained with preprocessing %s and is served with %s "
                "(within the tolerance in docs/training.md, Preprocessing)",
                self.name, self.version, self.card.preprocessing, PREPROCESSING_VERSION,
            )  # fmt: skip

    def metadata(self) -> dict[str, Any]:
        """What /metadata shows: name, version, what computes it and the model card."""
        return {"model": self.name, "version": self.version, "runtime": self.runtime.describe(),
                **self.card.to_metadata()}  # fmt: skip


# Largest batch warmed up on JAX: the service's default max_batch_size.
WARM_BATCH_LIMIT = 32


def _warm_batch_sizes() -> list[int]:
    if _backend() != "jax":
        return [1, 2]
    return [1 << i for i in range(WARM_BATCH_LIMIT.bit_length())]


def _pad_batch(batch: np.ndarray) -> np.ndarray:
    """On JAX, pad to a power of two so jit compiles a few shapes, not one per batch size."""
    if _backend() != "jax":
        return batch
    size = 1 << (len(batch) - 1).bit_length()
    pad = np.zeros((size - len(batch), *batch.shape[1:]), batch.dtype)
    return np.concatenate([batch, pad]) if len(pad) else batch


@functools.cache
def _backend() -> str:
    import keras

    return keras.backend.backend()


def configure_accelerator() -> None:
    """Let TensorFlow grow GPU memory as needed instead of grabbing it all (TF only)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf  # only on the TensorFlow backend

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: growth can no longer be changed
            logger.warning("could not enable memory growth on %s", gpu.name)


# Set in the HTTP front at start-up: it decodes and resizes with Pillow on the CPU. Should
# anything import an ML framework there, on JAX each front would otherwise claim the GPU
# and preallocate most of its memory beside the model process that needs it.
FRONT_ENV = {"JAX_PLATFORMS": "cpu", "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "CUDA_VISIBLE_DEVICES": ""}


def keep_off_accelerators() -> None:
    """Hide every GPU from this process (the HTTP front); only the model process uses one.

    It must run before any ML framework is imported here: a warning says when too late.
    """
    os.environ.update(FRONT_ENV)
    imported = [name for name in ("jax", "tensorflow", "torch") if name in sys.modules]
    if imported:
        logger.warning("%s already imported: this front process may still hold a GPU", imported)
