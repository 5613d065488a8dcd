"""Read registered versions back: status, held-out metrics, card, model, and which is champion.

Writing them (registering, setting a status) is registry/register.py.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from imgcls.modelcard import ModelCard
from registry.settings import RegistrySettings

log = logging.getLogger(__name__)

STATUS_TAG = "imgcls.status"
# The run metrics that hold the held-out figures: `test_accuracy`, `test_recall_<class>`, ...
RUN_METRIC_PREFIX = "test_"


class RegistryError(RuntimeError):
    """A registry request that cannot be carried out; the message says why."""


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
