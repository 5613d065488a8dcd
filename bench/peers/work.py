"""What every peer server does per request and per batch: the service's own steps."""

from __future__ import annotations

import contextlib
import ctypes
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.peers import MODEL_PROCESS_NAME

# Top labels per answer: the service's default top_k.
TOP_K = 3

# A batch (N, H, W, 3) float32 -> probabilities (N, classes).
Predict = Callable[[np.ndarray], np.ndarray]


def load_model(path: str):
    """The `.keras` file, loaded as the service loads it (safe mode, no compile)."""
    from service.store import load_keras

    return load_keras(path)


def load_predict(path: str, runtime: str = "keras", precision: str = "f32") -> Predict:
    """What computes the answers: keras, `predict_on_batch` on the `.keras` file; openvino,
    its build in `precision` (exported into a folder beside the file: the benchmark's
    temporary one, removed with it)."""
    model = load_model(path)
    if runtime == "keras":
        return lambda batch: np.asarray(model.predict_on_batch(batch))
    folder = Path(tempfile.mkdtemp(prefix="openvino-peer-", dir=Path(path).parent))
    return compiled_model(model, precision, folder)


def compiled_model(model, precision: str, folder: Path) -> Predict:
    """The Keras model's OpenVINO build in `precision`, exported into `folder` (once) and
    compiled with the service's own settings (service/compiled.py: LATENCY hint, every core)."""
    from service.compiled import CompiledModel, config, export_build, openvino

    xml = export_build(model, folder)
    return CompiledModel(openvino().Core().compile_model(str(xml), "CPU", config(precision, folder)))


def model_input(data: bytes, size: int) -> np.ndarray:
    """JPEG bytes to the model's (size, size, 3) uint8 input: decode_image + prepare_image."""
    from imgcls.images import decode_image, prepare_image

    return prepare_image(decode_image(data, target=(size, size)), (size, size))


def answers(predict: Predict, images: list[np.ndarray], class_names: list[str]) -> list[dict]:
    """One forward pass over the batch; the top labels of each image."""
    from service.predictor import top_k

    probs = predict(np.stack(images).astype(np.float32))
    return [{"predictions": top_k(row, class_names, TOP_K)} for row in probs]


def name_this_process() -> None:
    """Mark the process that holds the model (Linux prctl PR_SET_NAME; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(MODEL_PROCESS_NAME.encode()), 0, 0, 0)


def warm_up(predict: Predict, size: int) -> None:
    """Batches of 1 and 2, as the service's warm-up: from the second shape on, Keras on
    TensorFlow traces one function for any batch size, so no request pays for tracing."""
    for batch in (1, 2):
        predict(np.zeros((batch, size, size, 3), np.float32))
