"""Training benchmarks: quality on real data and speed against the backbone's own limit.

    python -m bench.train_bench [--only quality|speed] [--shared ../shared] [--out FILE]

Quality: the course CNN on MNIST (target >= 0.98 test accuracy); VGG16 on the CIFAR-10
subset with the real ImageNet weights file vs random weights.
Speed: images/s of epoch 1 and of later epochs with and without backbone feature caching,
and with augmentation on, against the raw backbone forward throughput measured in the same
process. Targets: cached epochs 2..N < 5% of epoch 1; augmented training >= 0.85x forward.
Defaults (issue 12): the default command (`imgcls train --data D`, and `--backbone`,
`--weights` the shared file, `--image-size` where named) on MNIST 500 per class with
simple_cnn (target >= 0.97); on the CIFAR-10 subset at 96 px with VGG16, alone and with
`--search 20` (target >= 0.655: 0.605 + 5 points), and with live augmentation
(`--augment-passes 0`) beside the cached passes; on a small photo folder at 224 px
(~250 images, target under 5 minutes) against a linear probe on the same frozen features
and with live augmentation; and for each VGG16 folder, the run's time against one
backbone pass over all its images (target <= 2x).
Needs ../shared (not shipped with the package); prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench import harness
from bench.train_data import extract


def run(config, home: Path):
    """One tracked training run of `config` into a SQLite MLflow store in `home`."""
    from imgcls.settings import TrackingSettings
    from training.train import train

    settings = TrackingSettings(home=home, tracking_uri=f"sqlite:///{home}/bench.db", experiment_name="bench")
    return train(config, settings)


def train_with(home: Path, **options):
    """`run` of the default config with `options` (config fields; "augment.enabled" and such too)."""
    from training.config import load_config

    return run(load_config(None, **options), home)


def quality(shared: Path, work: Path) -> dict:
    off = {"augment.enabled": False}
    mnist = extract(shared / "data/mnist-png.tar.gz", work / "mnist")
    result = train_with(
        work / "runs", data=mnist, backbone="simple_cnn", image_size=28, epochs=5, batch_size=32, **off
    )
    out = {"mnist_simple_cnn": {"test_images": len(result.evaluation.y_true), "epochs": len(result.history["loss"]),
                                "test_accuracy": result.metrics["accuracy"], "seconds": sum(result.epoch_seconds)}}  # fmt: skip
    cifar = extract(shared / "data/cifar10-small.tar.gz", work / "cifar")
    weights = str(shared / "weights/vgg16_imagenet_notop.h5")
    # The course's figures read the last block; the third row is today's default at 96 px.
    for label, value, blocks in (("pretrained", weights, "last"), ("random", "none", "last"),
                                 ("pretrained_two_blocks", weights, "auto")):  # fmt: skip
        result = train_with(work / "runs", data=cifar, backbone="vgg16", weights=value, image_size=96, epochs=30,
                            backbone_blocks=blocks, **off)  # fmt: skip
        out[f"cifar10_vgg16_{label}"] = {"test_images": len(result.evaluation.y_true),
                                         "test_accuracy": result.metrics["accuracy"],
                                         "test_macro_f1": result.metrics["macro_f1"]}  # fmt: skip
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
    cifar = extract(shared / "data/cifar10-small.tar.gz", work / "cifar")
    base = {"data": cifar, "backbone": backbone, "weights": "none", "image_size": size, "epochs": epochs}
    base |= {"early_stopping_patience": 100, "batch_size": 32}
    out: dict = {"backbone": backbone, "image_size": size}
    for label, extra in (
        ("cached", {"augment.enabled": False, "cache_features": True}),
        ("uncached", {"augment.enabled": False, "cache_features": False}),
        ("augmented", {"augment.enabled": True, "augment_passes": 0}),
        ("augmented_cached_passes", {"augment.enabled": True}),
    ):
        result = train_with(work / "runs", **base, **extra)
        n, first, *later = len(result.scan.files["train"]), *result.epoch_seconds
        later_s = sum(later) / len(later)
        out[label] = {"train_images": n, "epoch1_images_per_s": n / first, "later_epochs_images_per_s": n / later_s,
                      "later_epoch_fraction_of_epoch1": later_s / first}  # fmt: skip
    out["forward_images_per_s"] = forward_throughput(backbone, size, images=1000, batch=32)
    out["augmented_vs_forward"] = out["augmented"]["later_epochs_images_per_s"] / out["forward_images_per_s"]
    return out


DEFAULT_ROWS = ("mnist", "cifar", "cifar_search", "cifar_live", "photo", "photo_search", "photo_live")


def defaults(shared: Path, work: Path, rows=DEFAULT_ROWS, seeds=None, extra=None) -> dict:
    """The issue-12 rows: each the default command on a folder, timed end to end.

    `seeds`: each row once per seed (named `row@seed<N>`; the seed moves the split, the
    trials and the initialisation); `extra`: config fields added to every row's options.
    """
    from bench.train_data import mnist_subset, photo_folder

    weights = str(shared / "weights/vgg16_imagenet_notop.h5")
    cifar = extract(shared / "data/cifar10-small.tar.gz", work / "cifar")
    folders = {
        "mnist": (
            mnist_subset(shared / "data/mnist-png.tar.gz", work / "mnist500", 500),
            {"backbone": "simple_cnn"},
        ),
        "cifar": (cifar, {"weights": weights, "image_size": 96}),
        "cifar_search": (cifar, {"weights": weights, "image_size": 96, "search": 20}),
        "cifar_live": (cifar, {"weights": weights, "image_size": 96, "augment_passes": 0}),
        "photo": (
            photo_folder(shared / "data/cifar10-small.tar.gz", work / "photos", 5, 50),
            {"weights": weights},
        ),
    }
    folders["photo_live"] = (folders["photo"][0], {"weights": weights, "augment_passes": 0})
    # The search's cost against a 224-px backbone pass (the CIFAR row's is at 96 px).
    folders["photo_search"] = (folders["photo"][0], {"weights": weights, "search": 20})
    out = {}
    for row in rows:
        data, options = folders[row]
        for seed in seeds or [None]:
            name, run_options = row, options | (extra or {})
            if seed is not None:
                name, run_options = f"{row}@seed{seed}", run_options | {"seed": seed}
            out[name] = default_command(data, run_options, work / "runs")
            print(json.dumps({name: out[name]}), flush=True)
    return out


def default_command(data: Path, options: dict, home: Path) -> dict:
    """One run of the default command (plus `options`): accuracy, seconds, and for a
    backbone the time of one forward pass over all its images and a linear probe."""
    from training.config import load_config

    config = load_config(None, data=data, **options)
    start = time.perf_counter()
    result = run(config, home)
    seconds = time.perf_counter() - start
    client_run = _mlflow_run(result.run_id)
    out = {
        "options": {k: str(v) for k, v in options.items()},
        "fit_seconds": sum(result.epoch_seconds),  # backbone passes for the cache + head epochs
        "images": {split: len(files) for split, files in result.scan.files.items()},
        "augment": client_run.data.tags.get("augment.preset"),
        "augment_passes": client_run.data.params.get("augment_passes"),
        "epochs": len(result.history["loss"]),
        "test_accuracy": result.metrics["accuracy"],
        "test_macro_f1": result.metrics["macro_f1"],
        "seconds": seconds,
    }
    out |= {k: v for k, v in client_run.data.metrics.items() if k.startswith(("search_", "ensemble_"))}
    if config.backbone != "simple_cnn":
        out |= backbone_pass_and_probe(result, config)
        out["seconds_vs_backbone_pass"] = seconds / out["backbone_pass_seconds"]
    return out


TARGETS = {
    "mnist": ("test accuracy", lambda r: r["test_accuracy"] >= 0.97, ">= 0.97"),
    "cifar_search": ("test accuracy", lambda r: r["test_accuracy"] >= 0.655, ">= 0.655 (0.605 + 5 points)"),
    "photo": ("seconds", lambda r: r["seconds"] < 300, "< 300 s, vs linear probe"),
}
PASS_TARGET = ("run / pass", lambda r: r["seconds_vs_backbone_pass"] <= 2, "<= 2x one backbone pass")


def defaults_table(rows: dict) -> str:
    """The defaults rows as the Markdown table of docs/benchmarks.md."""
    header = ["row", "options", "images train/val/test", "augmentation", "epochs", "test accuracy", "seconds",
              "backbone pass (all images)", "run / pass", "linear probe", "target"]  # fmt: skip
    lines = []
    for name, r in rows.items():
        images = "/".join(str(r["images"][s]) for s in ("train", "val", "test"))
        options = ", ".join(f"{k}={Path(v).name if k == 'weights' else v}" for k, v in r["options"].items())
        passes = r.get("augment_passes")
        augmentation = f"{r['augment']}, passes {passes}" if passes not in (None, "None") else r["augment"]
        pass_s = f"{r['backbone_pass_seconds']:.1f} s" if "backbone_pass_seconds" in r else ""
        ratio = f"{r['seconds_vs_backbone_pass']:.2f}x" if "seconds_vs_backbone_pass" in r else ""
        probe = f"{r['linear_probe_test_accuracy']:.4f}" if "linear_probe_test_accuracy" in r else ""
        targets = [TARGETS[name.split("@")[0]]] if name.split("@")[0] in TARGETS else []
        if "seconds_vs_backbone_pass" in r and "search" not in r["options"]:
            targets.append(PASS_TARGET)  # any folder, the default command
        target = "; ".join(f"{text}: {'met' if met(r) else 'missed'}" for _, met, text in targets)
        lines.append([name, options, images, augmentation, r["epochs"], f"{r['test_accuracy']:.4f}",
                      f"{r['seconds']:.1f}", pass_s, ratio, probe, target])  # fmt: skip
    return harness.table(header, lines)


def _mlflow_run(run_id: str):
    import mlflow

    return mlflow.MlflowClient().get_run(run_id)


def backbone_pass_and_probe(result, config) -> dict:
    """One pass of the run's frozen backbone over all its images (train, val and test),
    the way a run makes its cache (`training.features.backbone_features`, batches of 32,
    its tracing included; decoding not), and a logistic-regression probe on those
    features (average-pooled; fit on train + val, scored on test)."""
    import numpy as np
    import tensorflow as tf
    from sklearn.linear_model import LogisticRegression

    from imgcls.images import load_image
    from training.features import backbone_features
    from training.model import ensemble_members, feature_extractor

    extractor = feature_extractor(result.model)
    batches, labels = {}, {}
    for split, files in result.scan.files.items():
        pixels = np.stack(
            [load_image((result.scan.root / f).read_bytes(), config.input_size) for f, _ in files]
        )
        labels[split] = np.array([label for _, label in files])
        batches[split] = tf.data.Dataset.from_tensor_slices((pixels, labels[split])).batch(32)
    start = time.perf_counter()
    maps = {s: backbone_features(extractor, b)[0] for s, b in batches.items()}
    seconds = time.perf_counter() - start
    pooled = {s: m.mean(axis=(1, 2)) for s, m in maps.items()}
    probe = LogisticRegression(max_iter=5000)
    probe.fit(
        np.concatenate([pooled["train"], pooled["val"]]), np.concatenate([labels["train"], labels["val"]])
    )
    out = {
        "backbone_pass_seconds": seconds,
        "backbone_pass_images": sum(len(y) for y in labels.values()),
        "linear_probe_test_accuracy": float(probe.score(pooled["test"], labels["test"])),
    }
    # An ensemble's members alone on test: what the average adds (reported, never chosen on).
    for i, member in enumerate(ensemble_members(result.model)):
        logits = np.asarray(member(maps["test"], training=False))
        out[f"ensemble_member_{i}_test_accuracy"] = float((logits.argmax(axis=1) == labels["test"]).mean())
    return out


def measure(args, work: Path) -> dict:
    if not (args.shared / "data").is_dir():
        raise SystemExit(f"shared data not found at {args.shared} (pass --shared)")
    results: dict = {}
    if args.only in (None, "quality"):
        results["quality"] = quality(args.shared, work)
    if args.only in (None, "speed"):
        results["speed"] = speed(args.shared, work)
    if args.only in (None, "defaults"):
        seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else None
        extra = dict(field.split("=", 1) for field in args.set)
        results["defaults"] = defaults(args.shared, work, args.rows.split(","), seeds, extra)
    return results


def render(results: dict) -> str:
    text = json.dumps(results, indent=1)
    return text + ("\n" + defaults_table(results["defaults"]) if "defaults" in results else "")


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__, "train_bench.json", logs=False)
    p.add_argument("--only", choices=["quality", "speed", "defaults"], help="run one part only")
    p.add_argument(
        "--rows",
        default=",".join(DEFAULT_ROWS),
        help=f"defaults rows, comma-separated ({', '.join(DEFAULT_ROWS)})",
    )
    p.add_argument("--seeds", help="defaults rows: run each once per seed, comma-separated (e.g. 42,0,1,2)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="defaults rows: a config field added to every row (e.g. ensemble_fit=train); repeatable",
    )
    args = p.parse_args(argv)
    harness.run("train-bench", args, lambda work, _stop: measure(args, work), render)


if __name__ == "__main__":
    main()
