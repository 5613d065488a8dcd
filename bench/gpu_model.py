"""The GPU benchmark's model side, run as a child process so its GPU memory is freed when
it exits: build ResNet50 (random weights) with the project's builder, time the call the
service makes at each batch size, and save the model into the BentoML store.

    python -m bench.gpu_model --precision float32 --size 224 --batches 1,32,128 \
        --seconds 10 --save --out speed.json

Prints nothing but progress; writes one JSON: the device, per-batch images/s and latency
percentiles of `Predictor.probabilities` (what the model process runs per batch, padding
included), the host-to-device transfer time of a batch, and the BentoML tag if saved.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench.cases import CLASSES, untrained_model
from bench.harness import percentiles, timed

NAME = "gpu-bench-resnet50"


def build(precision: str, size: int):
    """ResNet50 at `size` with the training head, weights=None, in `precision`."""
    import keras

    if precision == "bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    return untrained_model("resnet50", size)


def time_batch(predictor, batch: int, size: int, seconds: float) -> dict:
    """Images/s and per-call latency of `predictor.probabilities` on one batch size."""
    import numpy as np

    x = np.random.default_rng(batch).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    timing = timed(
        lambda _: predictor.probabilities(x), seconds=seconds
    )  # two untimed calls compile this shape
    row = {"batch": batch, "calls": len(timing.ms), "images_per_s": batch * len(timing.ms) / timing.wall_s}
    row["transfer_ms"] = transfer_ms(x)
    print(f"    batch {batch}: {row['images_per_s']:.1f} images/s", flush=True)
    return row | percentiles(timing.ms)


def transfer_ms(x) -> float | None:
    """Median ms to copy one float32 batch to the default device and wait for it (JAX)."""
    try:
        import jax
    except ImportError:
        return None
    return timed(lambda _: jax.device_put(x).block_until_ready(), 5, warm=0).median_ms


def device() -> str:
    import keras

    if keras.backend.backend() != "jax":
        return keras.backend.backend()
    import jax

    return ", ".join(str(d) for d in jax.devices())


def save(model, precision: str, size: int) -> str:
    """The model as a .keras file in the BentoML store (BENTOML_HOME); its tag."""
    from imgcls.modelcard import ModelCard
    from service.store import ALIAS_LABEL, REGISTERED_LABEL, save_to_bento_store

    card = ModelCard(class_names=CLASSES, image_size=(size, size), backbone="resnet50",
                     dataset_fingerprint=f"gpu-bench-{precision}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu-model-") as tmp:
        path = Path(tmp) / "model.keras"
        model.save(path)
        labels = {REGISTERED_LABEL: NAME, ALIAS_LABEL: "champion", "precision": precision}
        return save_to_bento_store(path, card, name=NAME, version=precision, extra_labels=labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--size", type=int, default=224, help="input size in pixels (224)")
    parser.add_argument("--batches", default="1,32,128", help="batch sizes to time")
    parser.add_argument("--seconds", type=float, default=10, help="timed seconds per batch size")
    parser.add_argument("--save", action="store_true", help="save the model into the BentoML store")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    args = parser.parse_args(argv)
    from imgcls.modelcard import ModelCard
    from service.predictor import Predictor

    started = time.perf_counter()
    model = build(args.precision, args.size)
    out = {"precision": args.precision, "size": args.size, "device": device(), "pid": os.getpid()}
    out["build_s"] = time.perf_counter() - started
    if args.save:
        out["bento_tag"] = save(model, args.precision, args.size)
    card = ModelCard(class_names=CLASSES, image_size=(args.size, args.size), backbone="resnet50")
    predictor = Predictor(model, card, args.precision)
    print(f"  in-process {args.precision} on {out['device']}", flush=True)
    out["rows"] = [time_batch(predictor, int(b), args.size, args.seconds) for b in args.batches.split(",")]
    out["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
