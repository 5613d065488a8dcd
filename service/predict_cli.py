"""`imgcls predict`: the command-line edge of service/batch_predict.py (arguments, exit
codes, what the terminal shows)."""

from __future__ import annotations

import argparse
from pathlib import Path

from service.batch_predict import Summary, list_files, predict_files
from service.cli import add_runtime_options


def register(subparsers) -> None:
    """Add `imgcls predict`."""
    p = subparsers.add_parser(
        "predict",
        help="classify image files offline with the champion, into a CSV",
        description="Classify every image in the given folders and files with the champion "
        "(or --version N), through the service's preprocessing, batched. Writes one CSV row "
        "per file: path, top-k labels and probabilities, version, and an error for files "
        "that could not be used. Exit code 0, or 2 on bad input (no files, no such model).",
    )
    p.add_argument("--data", nargs="+", type=Path, required=True, metavar="FOLDER_OR_FILE",
                   help="image files and/or folders (searched recursively)")  # fmt: skip
    p.add_argument("--version", help="registry version to use (default: the champion)")
    p.add_argument("--source", choices=["bentoml", "mlflow"],
                   help="the BentoML model store (default) or the MLflow registry")  # fmt: skip
    p.add_argument("--model-name", help="registered model name (default image-classifier)")
    p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write (predictions.csv)")
    add_runtime_options(p)
    p.add_argument("--top-k", type=int, default=3, help="labels per image (3)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (32)")
    p.add_argument("--min-confidence", type=float, metavar="P",
                   help="add an abstained column: true where the top probability is below P (default: off)")  # fmt: skip
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    """Run `imgcls predict`; 0 when the CSV is written, 2 on bad input, 1 on other errors."""
    if args.top_k < 1 or args.batch_size < 1:
        print("error: --top-k and --batch-size must be at least 1")
        return 2
    if args.min_confidence is not None and not 0 < args.min_confidence <= 1:
        print("error: --min-confidence must be in (0, 1]")
        return 2
    try:
        files = list_files(args.data)
    except FileNotFoundError as exc:
        print(f"error: {exc}")
        return 2
    if not files:
        print(f"error: no files under {', '.join(map(str, args.data))}")
        return 2
    try:
        predictor = _load(args)
    except LookupError as exc:
        print(f"error: {exc}")
        return 2
    summary = predict_files(
        predictor, files, args.out, top_k=args.top_k, batch_size=args.batch_size,
        min_confidence=args.min_confidence,
    )  # fmt: skip
    print_summary(summary, args.out)
    return 0


def _load(args: argparse.Namespace):
    """The model to predict with; LookupError when it does not exist (bad input)."""
    from service.settings import ServiceSettings
    from service.sources import load_predictor

    values = {"source": args.source, "version": args.version, "model_name": args.model_name,
              "runtime": args.runtime, "precision": args.precision}  # fmt: skip
    settings = ServiceSettings(**{k: v for k, v in values.items() if v is not None})
    which = f"version {settings.version}" if settings.version else "the champion"
    try:
        return load_predictor(settings)
    except Exception as exc:
        if _is_not_found(exc):
            raise LookupError(
                f"no model: {which} of {settings.model_name} ({settings.source}): {exc}"
            ) from exc
        raise


def _is_not_found(exc: BaseException) -> bool:
    """Whether a load failed because the model or version does not exist."""
    text = f"{type(exc).__name__} {exc} {exc.__cause__ or ''}".lower()
    return isinstance(exc, LookupError) or any(
        word in text for word in ("notfound", "not found", "does_not_exist", "not exist", "no local copy")
    )


def print_summary(summary: Summary, out: Path) -> None:
    """The result on the terminal: counts, speed, where the CSV is."""
    rate = summary.images / summary.seconds if summary.seconds else 0.0
    print(f"classified {summary.images} image(s) with version {summary.version} ({summary.runtime}) "
          f"in {summary.seconds:.1f} s "
          f"({rate:.1f} images/s): {out}")  # fmt: skip
    if summary.abstained:
        print(f"abstained on {summary.abstained} image(s) below the --min-confidence threshold")
    if summary.skipped:
        print(f"skipped {summary.skipped} file(s) that could not be used: see the error column of {out}")
