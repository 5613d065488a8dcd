"""Register a run's model as a new version, and read versions back (tags, card, model).

A version is created with `imgcls.status=candidate`; the gate later marks it `promoted`
or `rejected`, and a pipeline that stops half-way marks it `interrupted` or `failed`.
Only the `champion` alias says which version is served.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from imgcls.modelcard import ModelCard
from imgcls.settings import TrackingSettings
from registry.settings import RegistrySettings

log = logging.getLogger(__name__)

STATUS_TAG = "imgcls.status"
# Metrics copied onto a version's tags, so `models list` needs no run look-ups. The
# per-class figures stay in the run's `test_*` metrics (see `version_metrics`): one tag
# per class and figure would bury the MLflow UI's tag column.
# ECE and NLL (calibration, lower is better) are shown beside accuracy and macro-F1.
KEY_METRICS = ("accuracy", "macro_f1", "ece", "nll")
# The run metrics that hold the held-out figures: `test_accuracy`, `test_recall_<class>`, ...
RUN_METRIC_PREFIX = "test_"


class RegistryError(RuntimeError):
    """A registry request that cannot be carried out; the message says why."""


def connect(tracking: TrackingSettings) -> MlflowClient:
    """A client on the configured store (created safely on first use); also points the
    `mlflow` module at it."""
    from training.tracking import open_store

    uri = open_store(tracking)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def version_tags(run_id: str, card: ModelCard, metrics: dict[str, float], git_revision: str | None) -> dict:
    """The tags a new version carries: where it came from and how it scored."""
    tags = {
        "run_id": run_id,
        "backbone": card.backbone,
        "dataset.fingerprint": card.dataset_fingerprint or "unknown",
        "class_names": json.dumps(card.class_names),
        "image_size": f"{card.image_size[0]}x{card.image_size[1]}",
        "class_count": str(len(card.class_names)),
        "temperature": f"{card.temperature:.4g}",  # its probabilities' calibration (training/calibrate.py)
        "head": card.head or "-",  # what reads the backbone (training.model.head_summary)
        "git.revision": git_revision or "unknown",
        STATUS_TAG: "candidate",
    }
    tags.update({f"metric.{k}": f"{metrics[k]:.6g}" for k in KEY_METRICS if k in metrics})
    return tags


def register_candidate(
    settings: RegistrySettings, model_uri: str, run_id: str, card: ModelCard, metrics: dict[str, float]
) -> str:
    """Create a new version of the registered model from a logged model; returns its number.

    MLflow must already point at the store (see `connect`).
    """
    from registry.describe import describe_version
    from training.tracking import git_revision

    tags = version_tags(run_id, card, metrics, git_revision())
    version = mlflow.register_model(model_uri, settings.model_name, tags=tags)
    log.info("registered %s version %s from run %s", settings.model_name, version.version, run_id)
    describe_version(MlflowClient(), settings, str(version.version))
    return str(version.version)


def set_status(
    client: MlflowClient, settings: RegistrySettings, version: str, status: str, why: str | None = None
) -> None:
    """Record where a version stands (candidate, promoted, rejected, interrupted, failed), and
    rewrite its description (`why`: the gate's reason, shown on the card)."""
    from registry.describe import describe_version

    client.set_model_version_tag(settings.model_name, version, STATUS_TAG, status)
    describe_version(client, settings, version, why)


def champion_version(client: MlflowClient, settings: RegistrySettings) -> str | None:
    """The version the champion alias points at, or None when there is no champion yet."""
    try:
        return str(client.get_model_version_by_alias(settings.model_name, settings.alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def version_metrics(client: MlflowClient, settings: RegistrySettings, version: str) -> dict[str, float]:
    """A version's held-out metrics (`accuracy`, `macro_f1`, `recall_<class>`, ...).

    Read from its run's `test_*` metrics, over its `metric.*` tags (versions registered
    before the run metrics were the source carry every per-class figure as a tag).
    """
    v = get_version(client, settings, version)
    run_metrics = {}
    if v.run_id:
        try:
            run_metrics = client.get_run(v.run_id).data.metrics
        except MlflowException:
            log.warning("the run of version %s cannot be read; using its tags", version, exc_info=True)
    return held_out_metrics(v.tags, run_metrics)


def held_out_metrics(tags: dict[str, str], run_metrics: dict[str, float]) -> dict[str, float]:
    """Held-out metrics from a version's `metric.*` tags and its run's `test_*` metrics (these win)."""
    metrics = {k.removeprefix("metric."): float(x) for k, x in tags.items() if k.startswith("metric.")}
    prefix = RUN_METRIC_PREFIX
    return metrics | {k.removeprefix(prefix): x for k, x in run_metrics.items() if k.startswith(prefix)}


def get_version(client: MlflowClient, settings: RegistrySettings, version: str | int):
    """The ModelVersion; RegistryError naming the version when it does not exist."""
    try:
        return client.get_model_version(settings.model_name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"{settings.model_name} has no version {version}") from exc


def version_card(settings: RegistrySettings, version: str) -> ModelCard:
    """The ModelCard stored with a version's model (classes, input size, backbone)."""
    info = mlflow.models.get_model_info(f"models:/{settings.model_name}/{version}")
    return ModelCard.from_metadata(info.metadata)


def download_keras_file(settings: RegistrySettings, version: str, dest: Path) -> Path:
    """Download a version's model into `dest`; returns the path of its `.keras` file."""
    uri = f"models:/{settings.model_name}/{version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    found = sorted(local.rglob("*.keras"))
    if not found:
        raise RegistryError(f"version {version} has no .keras file in its MLflow model")
    return found[0]


def load_version_model(settings: RegistrySettings, version: str):
    """(keras.Model, ModelCard) of a registered version, loaded safely and uncompiled."""
    import keras

    card = version_card(settings, version)
    with tempfile.TemporaryDirectory(prefix="imgcls-registry-") as tmp:
        path = download_keras_file(settings, version, Path(tmp))
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    return model, card
