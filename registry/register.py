"""Register a run's model as a new version, and record where each version stands.

A version is created with `imgcls.status=candidate`; the gate later marks it `promoted`
or `rejected`, and a pipeline that stops half-way marks it `interrupted` or `failed`.
Only the `champion` alias says which version is served. Every write rewrites the version's
description (registry/describe.py); reading versions back is registry/versions.py.
"""

from __future__ import annotations

import json
import logging

import mlflow
from mlflow import MlflowClient

from imgcls.modelcard import ModelCard
from imgcls.settings import TrackingSettings
from registry.describe import UNREAD, describe_version
from registry.settings import RegistrySettings
from registry.versions import STATUS_TAG

log = logging.getLogger(__name__)

# Metrics copied onto a version's tags, so `models list` needs no run look-ups. The
# per-class figures stay in the run's `test_*` metrics (registry.versions.version_metrics):
# one tag per class and figure would bury the MLflow UI's tag column.
# ECE and NLL (calibration, lower is better) are shown beside accuracy and macro-F1.
KEY_METRICS = ("accuracy", "macro_f1", "ece", "nll")


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
    from training.tracking import git_revision

    tags = version_tags(run_id, card, metrics, git_revision())
    version = mlflow.register_model(model_uri, settings.model_name, tags=tags)
    log.info("registered %s version %s from run %s", settings.model_name, version.version, run_id)
    describe_version(MlflowClient(), settings, str(version.version))
    return str(version.version)


def set_status(
    client: MlflowClient,
    settings: RegistrySettings,
    version: str,
    status: str,
    why: str | None = None,
    champion=UNREAD,
) -> None:
    """Record where a version stands (candidate, promoted, rejected, interrupted, failed), and
    rewrite its description (`why`: the gate's reason, shown on the card; `champion`: the
    alias's version if the caller knows it, else it is read)."""
    client.set_model_version_tag(settings.model_name, version, STATUS_TAG, status)
    describe_version(client, settings, version, why, champion)
