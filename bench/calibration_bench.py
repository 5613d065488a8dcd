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

import argparse
import json
import sys
import time
from pathlib import Path

if not __package__:  # `python bench/calibration_bench.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import bench_home, machine, quiet_environment  # noqa: E402
from bench.train_bench import extract  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "simple_cnn": {"backbone": "simple_cnn", "image_size": 32},
    "vgg16": {"backbone": "vgg16", "image_size": 96, "augment.preset": "none"},
}


def calibration_case(name: str, data: Path, shared: Path, work: Path) -> dict:
    """One training run with the defaults of `name`; its calibration figures."""
    from mlflow import MlflowClient

    from imgcls.settings import TrackingSettings
    from training.config import load_config
    from training.train import train

    options = dict(CASES[name])
    if options["backbone"] == "vgg16":
        options["weights"] = str(shared / "weights/vgg16_imagenet_notop.h5")
    settings = TrackingSettings(home=work, tracking_uri=f"sqlite:///{work}/bench.db", experiment_name="calib")
    start = time.perf_counter()
    result = train(load_config(None, data=data, **options), settings)
    seconds = time.perf_counter() - start
    run = MlflowClient(settings.resolved_tracking_uri()).get_run(result.run_id)
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
    rows = [
        "| model | train / val / test | epochs | T | test ECE before -> after | test NLL before -> after "
        "| test accuracy | run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rows.append(
            f"| {name} {r['options']['image_size']}px | {r['train_images']} / {r['val_images']} / "
            f"{r['test_images']} | {r['epochs']} | {r['temperature']:.3f} | {r['test_ece_before']:.4f} -> "
            f"**{r['test_ece_after']:.4f}** | {r['test_nll_before']:.4f} -> **{r['test_nll_after']:.4f}** "
            f"| {r['test_accuracy']:.4f} | {r['seconds']:.0f} s |"
        )
    return "\n".join(rows)


def main() -> None:
    quiet_environment()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(CASES), help="run one case only")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared data folder")
    parser.add_argument(
        "--out", type=Path, default=ROOT / ".imgcls/bench/calibration_bench.json", help="JSON results file"
    )
    args = parser.parse_args()
    if not (args.shared / "data").is_dir():
        raise SystemExit(f"shared data not found at {args.shared} (pass --shared)")
    results: dict = {}
    info = machine()
    with bench_home("imgcls-calib-", None) as (work, _):
        data = extract(args.shared / "data/cifar10-small.tar.gz", work / "cifar")
        for name in [args.only] if args.only else list(CASES):
            results[name] = calibration_case(name, data, args.shared, work / name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "results": results}, indent=1))
    print(json.dumps(info))
    print(table(results))


if __name__ == "__main__":
    main()
