"""MLflow wiring for training runs: where runs go, what a run records, how it ends."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import tempfile
from pathlib import Path

import keras
import mlflow
import numpy as np

from imgcls import parity
from imgcls.modelcard import ModelCard
from imgcls.redact import redact_uri
from imgcls.settings import TrackingSettings

log = logging.getLogger(__name__)
_announced: set[str] = set()  # stores already named on the terminal by this process


def open_store(settings: TrackingSettings) -> str:
    """Point MLflow's tracking and registry at the configured store; returns its URI.

    A new local SQLite store is created under a file lock: MLflow's schema migration fails
    ("duplicate column") when two processes create the same database at once.
    """
    import fcntl

    uri = settings.resolved_tracking_uri()
    if uri not in _announced:  # a pipeline opens the store once per stage: say it once
        _announced.add(uri)
        log.info("tracking at %s", redact_uri(uri))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        database.parent.mkdir(parents=True, exist_ok=True)
        with open(database.with_name(database.name + ".init.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            mlflow.MlflowClient(uri, uri).search_registered_models(max_results=1)
    return uri


def configure_mlflow(settings: TrackingSettings) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id.

    A local SQLite store puts its artifacts in `home/mlartifacts`, created on first use.
    """
    open_store(settings)
    experiment_id = _retry_on_conflict(lambda: _experiment_id(settings))
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _experiment_id(settings: TrackingSettings) -> str:
    experiment = mlflow.get_experiment_by_name(settings.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(settings.experiment_name, artifact_location=settings.artifact_root())


def _retry_on_conflict(write, attempts: int = 5):
    """Run a store write again when a concurrent writer made it collide.

    MLflow's SQL store checks-then-inserts some rows (experiments, dataset records), so
    two runs starting together can hit a UNIQUE constraint; the failed transaction left
    nothing behind, and the retry finds the row the other writer made.
    """
    import time

    for attempt in range(attempts):
        try:
            return write()
        except mlflow.exceptions.MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


@contextlib.contextmanager
def tracked_run(settings: TrackingSettings, run_name: str | None = None, tags: dict | None = None):
    """An MLflow run that ends FINISHED, FAILED on an error, or KILLED on Ctrl-C."""
    configure_mlflow(settings)
    run = mlflow.start_run(run_name=run_name, tags=tags)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")


def git_revision() -> str | None:
    """The code's git commit, when it runs from a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def log_dataset(scan, context: str = "training") -> None:
    """Dataset fingerprint, class counts, split sizes and the left-out files."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    report = scan.report()
    dataset = MetaDataset(
        source=LocalArtifactDatasetSource(str(scan.root)),
        name=scan.root.name,
        digest=scan.fingerprint,
    )
    _retry_on_conflict(lambda: mlflow.log_input(dataset, context=context))
    mlflow.set_tags({"dataset.fingerprint": scan.fingerprint, "dataset.root": str(scan.root)})
    mlflow.log_params({f"data.count.{k}": v for k, v in report["class_counts"].items()})
    mlflow.log_params({f"data.split.{k}": v for k, v in report["split_sizes"].items()})
    mlflow.log_param("data.bad_files", len(scan.bad_files))
    mlflow.log_dict(report, "data/data_report.json")
    mlflow.log_dict(scan.manifest(), "data/split.json")


def log_figure(figure, name: str) -> None:
    """Log a matplotlib figure under plots/ and close it."""
    if figure is None:
        return
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, f"plots/{name}.png")
    plt.close(figure)


class EpochMetricsLogger(keras.callbacks.Callback):
    """Per-epoch metrics to MLflow; `offset` continues the step count across phases."""

    def __init__(self, offset: int = 0, prefix: str = ""):
        super().__init__()
        self.offset, self.prefix = offset, prefix

    def on_epoch_end(self, epoch, logs=None):
        values = {f"{self.prefix}{k}": float(v) for k, v in (logs or {}).items() if np.isscalar(v)}
        if self.model is not None and hasattr(self.model, "optimizer"):
            values["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        mlflow.log_metrics(values, step=self.offset + epoch)


def log_keras_model(model: keras.Model, card: ModelCard, example: np.ndarray, parity_images=None) -> str:
    """Log the model with signature, input example, requirements, its card and its parity
    set (`parity.npz` in the model's artifacts, downloaded with every version); its URI."""
    from mlflow.models import infer_signature

    example = example.astype("float32")
    signature = infer_signature(example, np.asarray(model.predict_on_batch(example)))
    with _example_folder_created(), _no_progress_bars():
        info = mlflow.keras.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            pip_requirements=_pip_requirements(),
            metadata=card.to_metadata(),
        )
    mlflow.log_dict(card.to_metadata(), "model_card.json")
    if parity_images is not None and len(parity_images):
        with tempfile.TemporaryDirectory(prefix="imgcls-parity-") as tmp:
            path = parity.save(parity_images, Path(tmp) / parity.PARITY_FILE)
            mlflow.MlflowClient().log_model_artifact(info.model_id, str(path))
    return info.model_uri


@contextlib.contextmanager
def _no_progress_bars():
    """No Keras progress bar while MLflow checks the input example with `model.predict`
    (the user sees two "1/1" bars that belong to no step of theirs)."""
    was_on = keras.config.is_interactive_logging_enabled()
    keras.config.disable_interactive_logging()
    try:
        yield
    finally:
        if was_on:
            keras.config.enable_interactive_logging()


@contextlib.contextmanager
def _example_folder_created():
    """mlflow 3.17's Keras flavour writes the input example before it creates the model
    folder (FileNotFoundError); create the folder first, for the duration of one call."""
    import os

    from mlflow.keras import save as keras_save

    original = keras_save._save_example

    def save_example(mlflow_model, input_example, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, input_example, path, *args, **kwargs)

    keras_save._save_example = save_example
    try:
        yield
    finally:
        keras_save._save_example = original


def _pip_requirements() -> list[str]:
    import importlib.metadata as md

    reqs = [f"keras=={keras.__version__}", f"numpy=={np.__version__}"]
    for name in ("tensorflow-cpu", "tensorflow", "pillow"):
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            continue
        # tensorflow-cpu is the Linux CPU build of tensorflow; servers may have either.
        reqs.append(f"{'tensorflow' if name.startswith('tensorflow') else name}=={version}")
    return sorted(set(reqs))


def log_text(text: str, path: str) -> None:
    """Log a text artifact."""
    mlflow.log_text(text, path)
