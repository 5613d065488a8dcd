"""Training benchmarks: quality on real data and speed against the backbone's own limit.

    python -m bench.train_bench [--only quality|speed] [--shared ../shared] [--out FILE]

Quality: the course CNN on MNIST (target >= 0.98 test accuracy); VGG16 on the CIFAR-10
subset with the real ImageNet weights file vs random weights.
Speed: images/s of epoch 1 and of later epochs with and without backbone feature caching,
and with augmentation on, against the raw backbone forward throughput measured in the same
process. Targets: cached epochs 2..N < 5% of epoch 1; augmented training >= 0.85x forward.
Needs ../shared (not shipped with the package); prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

if not __package__:  # `python bench/train_bench.py` from a checkout: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine, quiet_environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def extract(archive: Path, dest: Path) -> Path:
    """Unpack a shared data archive once; returns the folder holding train/ and test/."""
    marker = dest / ".done"
    if not marker.exists():
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        marker.touch()
    return next(p.parent for p in dest.rglob("train") if p.is_dir())


def run(config, home: Path):
    from imgcls.settings import TrackingSettings
    from training.train import train

    settings = TrackingSettings(home=home, tracking_uri=f"sqlite:///{home}/bench.db", experiment_name="bench")
    return train(config, settings)


def quality(shared: Path, work: Path) -> dict:
    from training.config import load_config

    out = {}
    mnist = extract(shared / "data/mnist-png.tar.gz", work / "mnist")
    config = load_config(
        None,
        data=mnist,
        backbone="simple_cnn",
        image_size=28,
        epochs=5,
        batch_size=32,
        **{"augment.enabled": False},
    )
    result = run(config, work / "runs")
    out["mnist_simple_cnn"] = {
        "test_images": len(result.evaluation.y_true),
        "epochs": len(result.history["loss"]),
        "test_accuracy": result.metrics["accuracy"],
        "seconds": sum(result.epoch_seconds),
    }
    cifar = extract(shared / "data/cifar10-small.tar.gz", work / "cifar")
    weights = shared / "weights/vgg16_imagenet_notop.h5"
    for label, value in (("pretrained", str(weights)), ("random", "none")):
        config = load_config(
            None,
            data=cifar,
            backbone="vgg16",
            weights=value,
            image_size=96,
            epochs=30,
            **{"augment.enabled": False},
        )
        result = run(config, work / "runs")
        out[f"cifar10_vgg16_{label}"] = {
            "test_images": len(result.evaluation.y_true),
            "test_accuracy": result.metrics["accuracy"],
            "test_macro_f1": result.metrics["macro_f1"],
        }
    return out


def forward_throughput(backbone: str, size: int, images: int, batch: int) -> float:
    """Images/s of the frozen backbone's forward pass alone (the limit on this machine)."""
    import keras
    import numpy as np

    from training.model import build_backbone, caffe_preprocessing

    model = keras.Sequential(
        [keras.Input((size, size, 3)), caffe_preprocessing(), build_backbone(backbone, None, (size, size))]
    )
    pixels = np.random.default_rng(0).uniform(0, 255, (images, size, size, 3)).astype("float32")
    model.predict(pixels[:batch], batch_size=batch, verbose=0)  # warm-up / tracing
    start = time.perf_counter()
    model.predict(pixels, batch_size=batch, verbose=0)
    return images / (time.perf_counter() - start)


def speed(shared: Path, work: Path, backbone: str = "vgg16", size: int = 96, epochs: int = 4) -> dict:
    from training.config import load_config

    cifar = extract(shared / "data/cifar10-small.tar.gz", work / "cifar")
    base = {"data": cifar, "backbone": backbone, "weights": "none", "image_size": size, "epochs": epochs}
    base |= {"early_stopping_patience": 100, "batch_size": 32}
    out: dict = {"backbone": backbone, "image_size": size}
    for label, extra in (
        ("cached", {"augment.enabled": False, "cache_features": True}),
        ("uncached", {"augment.enabled": False, "cache_features": False}),
        ("augmented", {"augment.enabled": True}),
    ):
        result = run(load_config(None, **base, **extra), work / "runs")
        n = len(result.scan.files["train"])
        seconds = result.epoch_seconds
        out[label] = {
            "train_images": n,
            "epoch1_images_per_s": n / seconds[0],
            "later_epochs_images_per_s": n / (sum(seconds[1:]) / len(seconds[1:])),
            "later_epoch_fraction_of_epoch1": (sum(seconds[1:]) / len(seconds[1:])) / seconds[0],
        }
    out["forward_images_per_s"] = forward_throughput(backbone, size, images=1000, batch=32)
    out["augmented_vs_forward"] = out["augmented"]["later_epochs_images_per_s"] / out["forward_images_per_s"]
    return out


def main() -> None:
    quiet_environment()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["quality", "speed"], help="run one half only")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared data folder")
    parser.add_argument(
        "--out", type=Path, default=ROOT / ".imgcls/bench/train_bench.json", help="JSON results file"
    )
    args = parser.parse_args()
    if not (args.shared / "data").is_dir():
        raise SystemExit(f"shared data not found at {args.shared} (pass --shared)")
    work = Path(tempfile.mkdtemp(prefix="imgcls-bench-"))
    results: dict = {"machine": machine()}
    if args.only in (None, "quality"):
        results["quality"] = quality(args.shared, work)
    if args.only in (None, "speed"):
        results["speed"] = speed(args.shared, work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
