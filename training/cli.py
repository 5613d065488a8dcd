"""`imgcls train`: the command-line edge of the training pipeline."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from imgcls.redact import redact_text

# Options shared by `imgcls train` and `imgcls pipeline`: name -> (config field, argparse kwargs).
TRAIN_OPTIONS: dict[str, tuple[str, dict]] = {
    "--backbone": (
        "backbone",
        {
            "choices": ["vgg16", "resnet50", "simple_cnn"],
            "help": "feature extractor (default vgg16)",
        },
    ),
    "--weights": (
        "weights",
        {"help": "backbone weights: imagenet (default), none, or a local .h5/.weights.h5 file"},
    ),
    "--epochs": (
        "epochs",
        {
            "type": int,
            "help": "maximum epochs of the head phase (default 20; early stopping may end sooner)",
        },
    ),
    "--learning-rate": (
        "learning_rate",
        {"type": float, "help": "Adam learning rate of the head phase (default 1e-3)"},
    ),
    "--batch-size": ("batch_size", {"type": int, "help": "images per step (default 32)"}),
    "--image-size": (
        "image_size",
        {"type": int, "help": "square input size in pixels (default: 224, or 28 for simple_cnn)"},
    ),
    "--seed": (
        "seed",
        {
            "type": int,
            "help": "seed for the split, the initialisation and augmentation (default 42)",
        },
    ),
    "--augment": (
        "augment.preset",
        {
            "choices": ["auto", "photo", "orientation_bound", "none"],
            "metavar": "PRESET",
            "help": "augmentation preset: auto (default: picked from the images and the backbone, "
            "see docs/training.md), photo, orientation_bound (digits, documents: no flips) or none",
        },
    ),
    "--search": (
        "search",
        {
            "type": int,
            "metavar": "N",
            "help": "try N head configurations (learning rate, dropout, units, pooling, weight decay, "
            "label smoothing) on the cached backbone features, pick the best on validation, train it "
            "(default 0: the head as configured)",
        },
    ),
    "--ensemble": (
        "search_ensemble",
        {
            "type": int,
            "metavar": "K",
            "help": "with --search: average the heads of its K best trials (on validation), each "
            "trained with its own configuration, in the saved model; without: K cross-fitted copies "
            "of the configured head where --ensemble-fit picks folds (default 5; 1: one head)",
        },
    ),
    "--ensemble-fit": (
        "ensemble_fit",
        {
            "choices": ["auto", "folds", "train"],
            "help": "how the K heads train: folds (train + validation in K folds, head i stops early on "
            "fold i and trains on the others), train (each on the training split, stopping on "
            "validation); default auto: folds when each head then sees more images than the training "
            "split and the backbone stays frozen",
        },
    ),
    "--augment-passes": (
        "augment_passes",
        {
            "type": int,
            "metavar": "K",
            "help": "with a frozen backbone, run it over K augmented copies of the training set once "
            "and train the head on their cached features (default auto when augmenting: as many as keep "
            "the backbone within 1.5 passes over all images, at least 1; 0: augment live, one backbone "
            "pass per epoch)",
        },
    ),
    "--backbone-blocks": (
        "backbone_blocks",
        {
            "choices": ["auto", "last", "last_two"],
            "help": "what the head reads: the last block's map, or the last two blocks pooled side by "
            "side (default auto: last_two when the last map is 3x3 or smaller, inputs under 128 px)",
        },
    ),
    "--fine-tune-layers": (
        "fine_tune.unfreeze_layers",
        {
            "type": int,
            "help": "unfreeze this many top backbone layers in a second phase (default 0: off)",
        },
    ),
    "--distribute": (
        "distribute",
        {
            "choices": ["none", "mirrored", "multi_worker"],
            "help": "tf.distribute strategy: mirrored = all local GPUs, multi_worker = TF_CONFIG cluster",
        },
    ),
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a training run (config file, data, overrides)."""
    parser.add_argument(
        "--data",
        type=Path,
        help="folder with one sub-folder per class (or train/val/test sub-folders)",
    )
    parser.add_argument(
        "--config", type=Path, help="YAML file of config fields; command-line options override it"
    )
    for flag, (_, kwargs) in TRAIN_OPTIONS.items():
        parser.add_argument(flag, default=None, **kwargs)
    parser.add_argument(
        "--no-augment",
        action="store_true",
        help="turn augmentation off (enables backbone feature caching)",
    )
    parser.add_argument(
        "--class-weight",
        choices=["none", "balanced"],
        default=None,
        help="weight the loss by inverse class frequency",
    )


def config_from_args(args: argparse.Namespace):
    """A validated TrainConfig from the parsed options; raises ConfigError."""
    from training.config import ConfigError, load_config

    overrides = {
        field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _) in TRAIN_OPTIONS.items()
    }
    overrides["data"] = args.data
    overrides["class_weight"] = args.class_weight
    if args.no_augment:
        overrides["augment.enabled"] = False
    try:
        return load_config(args.config, **overrides)
    except ConfigError as exc:
        raise ConfigError(_with_flags(str(exc))) from None


def _with_flags(message: str) -> str:
    """A config error with each field that has a command-line flag named with it:
    `search (--search): Input should be greater than or equal to 0`."""
    import re

    flags = {field: flag for flag, (field, _) in TRAIN_OPTIONS.items()}
    flags |= {"data": "--data", "class_weight": "--class-weight", "augment.enabled": "--no-augment"}

    def named(match: re.Match) -> str:
        field = match.group(1)
        return f"{field} ({flags[field]}):" if field in flags else match.group(0)

    return re.sub(r"(?<![\w.-])([a-z_]+(?:\.[a-z_]+)*):", named, message)


def register(subparsers) -> None:
    """Add `imgcls train`."""
    parser = subparsers.add_parser(
        "train",
        help="train a model on a folder of images and log the run to MLflow",
        description="Fine-tune a dense head on a frozen VGG16/ResNet50 (or train the small CNN), "
        "log everything to MLflow (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME honoured).",
    )
    add_train_arguments(parser)
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Run `imgcls train`; exit code 0 on success, 2 on bad input."""
    from training.config import ConfigError
    from training.data import DatasetError

    try:
        config = config_from_args(args)
        from training.train import train

        result = train(config)
    except (ConfigError, DatasetError) as exc:
        print(f"error: {redact_text(str(exc))}")
        return 2
    except Exception as exc:
        logging.getLogger(__name__).debug("training failed", exc_info=True)
        print(
            f"error: training failed: {type(exc).__name__}: {redact_text(str(exc))} (run with -v for the traceback)"
        )
        return 1
    print_result(result)
    return 0


def print_result(result) -> None:
    """The run id and a short results table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for path, reason in result.scan.bad_files:
        console.print(f"[yellow]left out[/yellow] {path}: {reason}")
    table = Table(title=f"run {result.run_id} - test split ({len(result.evaluation.y_true)} images)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("accuracy", f"{result.metrics['accuracy']:.4f}")
    table.add_row("macro-F1", f"{result.metrics['macro_f1']:.4f}")
    calibration = f"ECE / NLL (calibrated, T = {result.card.temperature:.3f})"  # training/calibrate.py
    table.add_row(calibration, f"{result.metrics['ece']:.4f} / {result.metrics['nll']:.4f}")
    for name, recall in result.evaluation.per_class_recall().items():
        table.add_row(f"recall {name}", f"{recall:.4f}")
    table.add_row(
        "parameters (trainable / frozen)", f"{result.params.trainable:,} / {result.params.frozen:,}"
    )
    console.print(table)
    console.print(f"run id: {result.run_id}\nmodel: {result.model_uri}")
