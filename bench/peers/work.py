"""What every peer server does per request and per batch: the service's own steps."""

from __future__ import annotations

import contextlib
import ctypes

import numpy as np

from bench.peers import MODEL_PROCESS_NAME

# Top labels per answer: the service's default top_k.
TOP_K = 3


def load_model(path: str):
    """The `.keras` file, loaded as the service loads it (safe mode, no compile)."""
    from service.store import load_keras

    return load_keras(path)


def model_input(data: bytes, size: int) -> np.ndarray:
    """JPEG bytes to the model's (size, size, 3) uint8 input: decode_image + prepare_image."""
    from imgcls.images import decode_image, prepare_image

    return prepare_image(decode_image(data, target=(size, size)), (size, size))


def answers(model, images: list[np.ndarray], class_names: list[str]) -> list[dict]:
    """One forward pass (`predict_on_batch`) over the batch; the top labels of each image."""
    from service.predictor import top_k

    probs = np.asarray(model.predict_on_batch(np.stack(images).astype(np.float32)))
    return [{"predictions": top_k(row, class_names, TOP_K)} for row in probs]


def name_this_process() -> None:
    """Mark the process that holds the model (Linux prctl PR_SET_NAME; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(MODEL_PROCESS_NAME.encode()), 0, 0, 0)


def warm_up(model, size: int) -> None:
    """Batches of 1 and 2, as the service's warm-up on TensorFlow: from the second shape on,
    Keras traces one function for any batch size, so no request pays for tracing."""
    for batch in (1, 2):
        model.predict_on_batch(np.zeros((batch, size, size, 3), np.float32))
