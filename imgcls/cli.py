"""The `imgcls` command: each stage registers its own subcommands.

`training/cli.py`, `registry/cli.py` and `service/cli.py` each expose `register(subparsers)`;
this module only collects them, configures logging and runs the chosen command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Stage modules that contribute subcommands, in the order of the model's life.
_STAGES = ("training.cli", "registry.cli", "service.cli", "service.predict_cli", "imgcls.demo")
# Commands that load TensorFlow in this process: their native stderr is filtered
# (imgcls/terminal.py) so that only lines a user can act on reach the terminal.
_QUIET_COMMANDS = frozenset({"train", "pipeline", "predict", "demo"})


def _quiet_environment() -> None:
    """No telemetry, no TensorFlow banner, no MLflow set-up notes or progress bars: set before any heavy
    import (MLflow configures its logger from MLFLOW_LOGGING_LEVEL when imported)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # The gate and the BentoML import download a model: a progress bar per call is noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _project_environment() -> None:
    """Keep BentoML's model store in the project folder unless BENTOML_HOME says otherwise,
    so `pipeline` (which imports champions) and `serve` (which loads them) agree."""
    from imgcls.settings import TrackingSettings

    os.environ.setdefault("BENTOML_HOME", str((TrackingSettings().home / "bentoml").resolve()))


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every stage's subcommands."""
    parser = argparse.ArgumentParser(
        prog="imgcls",
        description="Train, track, promote and serve transfer-learning image classifiers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _STAGES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    _quiet_environment()
    _project_environment()
    args = build_parser().parse_args(argv)
    log_stream = None  # sys.stderr
    if args.command in _QUIET_COMMANDS and not args.verbose:
        from imgcls import terminal

        terminal.hide_python_noise()
        log_stream = terminal.NativeStderrFilter().start().log_stream()
        # Prints and log lines in the order they happen, whole, also in a CI log or a file.
        terminal.whole_lines(sys.stdout)
    logging.basicConfig(
        stream=log_stream,
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from imgcls.redact import redact_logs

    redact_logs()  # no password of a tracking URI in any log line (imgcls/redact.py)
    for noisy in ("mlflow", "alembic", "urllib3", "absl", "h5py", "matplotlib", "PIL", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
