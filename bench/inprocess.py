"""(a) and (a'): the model's own speed, in this process, on the inputs the service sees:
Keras, and its OpenVINO build built as the LitServe peer builds it (bench.peers.work)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from bench.cases import ALIAS, Case
from bench.harness import percentiles, timed

RAW_BATCHES = (1, 8, 32)
# The compiled build: batch 1 (a lone request) and 32 (a full batch).
COMPILED_BATCHES = (1, 32)


def openvino_capabilities() -> list[str]:
    """What OpenVINO reports the CPU can compute in (FP32, BF16, ...); none where it cannot load."""
    from service.compiled import Unavailable, openvino

    try:
        return list(openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Unavailable as exc:
        print(f"    no compiled build: {exc}", flush=True)
        return []


def compiled_engines(case: Case, folder: Path) -> dict[str, Callable]:
    """`openvino-f32`, and `openvino-bf16` where OpenVINO reports BF16 -> the case's build
    in that precision (exported into `folder` once); none where OpenVINO cannot load."""
    from bench.peers.work import compiled_model
    from service.store import load_keras

    capabilities = openvino_capabilities()
    if not capabilities:
        return {}
    model = load_keras(case.keras_file)
    precisions = ["f32"] + (["bf16"] if "BF16" in capabilities else [])
    return {f"openvino-{p}": compiled_model(model, p, folder) for p in precisions}


def test_split_quality(case: Case, test: list[tuple[Path, int]], engines: dict[str, Callable]) -> dict:
    """Accuracy, macro-F1 and top-1 agreement with Keras on a trained case's test split, for
    Keras and each compiled engine (issue 20: f32 and bf16 side by side)."""
    import numpy as np
    from sklearn.metrics import f1_score

    from imgcls.images import load_image
    from service.store import load_keras

    model = load_keras(case.keras_file)
    inputs = np.stack([load_image(path.read_bytes(), (case.size, case.size)) for path, _ in test])
    labels = np.array([label for _, label in test])
    calls = {"keras": model.predict_on_batch, **engines}
    top1 = {name: np.concatenate([np.argmax(call(inputs[i : i + 32]), axis=1) for i in range(0, len(inputs), 32)])
            for name, call in calls.items()}  # fmt: skip
    return {
        name: {
            "images": len(labels),
            "accuracy": float(np.mean(pred == labels)),
            "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
            "agreement_with_keras": float(np.mean(pred == top1["keras"])),
        }
        for name, pred in top1.items()
    }


def raw_predict(
    case: Case, inputs, requests: Callable[[int], int], engines: dict[str, Callable] | None = None
) -> tuple[list[dict], object]:
    """(a) `model.predict` and (a') `predict_on_batch` at batch 1, 8, 32, then each compiled
    engine (its name as method) at batch 1 and 32; also Keras's probabilities."""
    from service.store import load_from_mlflow

    model, _card, _version = load_from_mlflow(f"models:/{case.name}@{ALIAS}")
    calls = in_process_calls(model)
    rows = [
        _raw_batch_level(method, call, inputs, batch, requests(batch))
        for method, call in calls.items()
        for batch in RAW_BATCHES
    ]
    rows += [
        _raw_batch_level(method, call, inputs, batch, requests(batch))
        for method, call in (engines or {}).items()
        for batch in COMPILED_BATCHES
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
    timing = timed(lambda i: call(batches[i]), len(batches))  # two untimed calls trace this shape
    images = batch * len(batches)
    row = {"method": method, "batch": batch, "requests": images, "errors": 0, "seconds": timing.wall_s}
    row |= {
        "images_per_s": images / timing.wall_s,
        "cpu_ms_per_image": {"in-process": 1000 * timing.cpu_s / images},
    }
    print(f"    {method} batch={batch}: {row['images_per_s']:.1f} images/s", flush=True)
    return row | percentiles(timing.ms) | {"load": os.getloadavg()[0]}


def keras_engine(case: Case) -> Callable:
    """`predict_on_batch` of the registered version's own `.keras` file."""
    from service.store import load_keras

    return load_keras(case.keras_file).predict_on_batch


def batch1_sender(engine: Callable, inputs):
    """A load-generator sender that runs the model itself, in this process: request `i` is
    `engine` (Keras `predict_on_batch` or a compiled build) on input `i` alone (the
    model's own batch-1 latency, measured in the same rounds as the servers, so a busy
    spell of the machine falls on both)."""
    for _ in range(2):
        engine(inputs[:1])  # trace this shape

    def send(i: int) -> None:
        engine(inputs[i % len(inputs)][None])

    return send


def preprocess_ms(jpegs: list[bytes], size: int) -> float:
    """Median ms of imgcls.images.load_image (decode + resize) per JPEG, in this process."""
    from imgcls.images import load_image

    return timed(lambda i: load_image(jpegs[i], (size, size)), len(jpegs), warm=0).median_ms


def follower_load_s(case: Case, cache_dir) -> float:
    """Seconds the follower's own swap path takes here, on a quiet process: resolve and
    download the registered version, load the `.keras` file, check it against its card,
    build and verify its compiled build, and warm it up (service.sources.MlflowSource.load,
    then service.follower.prepare)."""
    from service.follower import prepare
    from service.sources import MlflowSource

    source = MlflowSource(case.name, ALIAS, Path(cache_dir))
    start = time.perf_counter()
    predictor = prepare(source.load(case.version), source, case.version)
    seconds = time.perf_counter() - start
    del predictor
    import keras

    keras.backend.clear_session()
    return seconds
