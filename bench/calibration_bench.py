"""Calibration benchmark: ECE and NLL before and after temperature scaling (issue 12).

    python -m bench.calibration_bench [--only simple_cnn|vgg16] [--shared ../shared] [--out FILE]

Trains on the CIFAR-10 subset in ../shared with the default command (`imgcls train`'s
defaults but `--data` and `--backbone`): `simple_cnn` at 32x32, and VGG16 at 96x96 with the
shared ImageNet weights file and `--augment none` (the head trains on cached features: one
backbone pass per split). T is fitted on the validation split (with cross-fitted heads, the
default there, on their out-of-fold validation logits); the table shows the test
split before and after, read from the run's `calibration.*` metrics. Prints a Markdown
table and writes JSON.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench import harness
from bench.train_bench import train_with
from bench.train_data import extract

CASES = {
    "simple_cnn": {"backbone": "simple_cnn", "image_size": 32},
    "vgg16": {"backbone": "vgg16", "image_size": 96, "augment.preset": "none"},
}


def calibration_case(name: str, data: Path, shared: Path, work: Path) -> dict:
    """One training run with the defaults of `name`; its calibration figures."""
    from mlflow import MlflowClient

    options = dict(CASES[name])
    if options["backbone"] == "vgg16":
        options["weights"] = str(shared / "weights/vgg16_imagenet_notop.h5")
    start = time.perf_counter()
    result = train_with(work, data=data, **options)
    seconds = time.perf_counter() - start
    run = MlflowClient(f"sqlite:///{work}/bench.db").get_run(result.run_id)
    figures = {
        k.removeprefix("calibration."): v for k, v in run.data.metrics.items() if k.startswith("calibration.")
    }
    return {
        "options": options,
        "train_images": len(result.scan.files["train"]),
        "val_images": len(result.scan.files["val"]),
        "test_images": len(result.evaluation.y_true),
        "epochs": len(result.history["loss"]),
        "test_accuracy": result.metrics["accuracy"],
        "reason": run.data.tags.get("calibration.reason", ""),
        "seconds": seconds,
        **figures,
    }


def table(results: dict) -> str:
    """The Markdown table of docs/benchmarks.md."""
    header = ["model", "train / val / test", "epochs", "T", "test ECE before -> after", "test NLL before -> after",
              "test accuracy", "run"]  # fmt: skip
    return harness.table(header, ([
        f"{name} {r['options']['image_size']}px", f"{r['train_images']} / {r['val_images']} / {r['test_images']}",
        r["epochs"], f"{r['temperature']:.3f}", f"{r['test_ece_before']:.4f} -> **{r['test_ece_after']:.4f}**",
        f"{r['test_nll_before']:.4f} -> **{r['test_nll_after']:.4f}**", f"{r['test_accuracy']:.4f}",
        f"{r['seconds']:.0f} s"] for name, r in results.items()))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__, "calibration_bench.json", logs=False)
    p.add_argument("--only", choices=sorted(CASES), help="run one case only")
    args = p.parse_args(argv)
    if not (args.shared / "data").is_dir():
        raise SystemExit(f"shared data not found at {args.shared} (pass --shared)")

    def measure(work: Path, _stop) -> dict:
        data = extract(args.shared / "data/cifar10-small.tar.gz", work / "cifar")
        names = [args.only] if args.only else list(CASES)
        return {"results": {name: calibration_case(name, data, args.shared, work / name) for name in names}}

    harness.run("calib", args, measure, lambda results: table(results["results"]))


if __name__ == "__main__":
    main()
