"""Where a served model comes from: the BentoML model store or the MLflow registry.

The registry calls `save_to_bento_store` when a version becomes champion; the service
loads with `load_from_bento_store` or `load_from_mlflow`. Each returns the Keras model,
its `ModelCard` and the registry version, so the service never guesses any of them.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from imgcls.modelcard import ModelCard
from imgcls.parity import PARITY_FILE

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
VERSION_LABEL = "registry_version"
# Set by the registry on the entry of the current champion (`alias=champion`); the
# registry deletes earlier champions' entries once the alias has moved.
ALIAS_LABEL = "alias"
REGISTERED_LABEL = "registered_model"


def save_to_bento_store(
    keras_path: str | Path,
    card: ModelCard,
    name: str = "image-classifier",
    version: str | int | None = None,
    extra_labels: dict[str, str] | None = None,
    parity_path: str | Path | None = None,
) -> str:
    """Copy a `.keras` file (and its parity set) into the BentoML model store; the new tag.

    `version` is the MLflow registry version, kept as the `registry_version` label;
    the store's current BENTOML_HOME is used.
    """
    import bentoml

    labels = {VERSION_LABEL: str(version) if version is not None else "unregistered"}
    labels.update({k: str(v) for k, v in (extra_labels or {}).items()})
    with bentoml.models.create(name, labels=labels, metadata=card.to_metadata()) as bento:
        shutil.copyfile(keras_path, bento.path_of(MODEL_FILE))
        if parity_path is not None:
            shutil.copyfile(parity_path, bento.path_of(PARITY_FILE))
    logger.info("saved %s (registry version %s) to the BentoML store", bento.tag, version)
    return str(bento.tag)


def load_from_bento_store(tag_or_name: str) -> tuple[keras.Model, ModelCard, str]:
    """Load (model, card, registry version) from a BentoML tag or name (its latest)."""
    import bentoml

    bento = bentoml.models.get(tag_or_name)
    card = ModelCard.from_metadata(bento.info.metadata)
    version = str(bento.info.labels.get(VERSION_LABEL, bento.tag.version))
    return load_keras(bento.path_of(MODEL_FILE)), card, version


def champion_entries(name: str, alias: str, registered_model: str | None = None) -> list:
    """The store's entries of `name` labelled `alias=<alias>` (of `registered_model` if
    given), newest first."""
    import bentoml

    try:
        entries = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        return []
    found = [
        m
        for m in entries
        if m.info.labels.get(ALIAS_LABEL) == alias
        and registered_model in (None, m.info.labels.get(REGISTERED_LABEL))
    ]
    return sorted(found, key=lambda m: m.info.creation_time, reverse=True)


def champion_tag(name: str, alias: str, registered_model: str | None = None) -> str:
    """The tag to serve for `name`: its newest entry labelled as the `alias` champion, or
    its newest entry when none is labelled (models saved by hand, outside the registry)."""
    entries = champion_entries(name, alias, registered_model)
    return str(entries[0].tag) if entries else name


def load_from_mlflow(model_uri: str) -> tuple[keras.Model, ModelCard, str]:
    """Load (model, card, version) from `models:/<name>@<alias>` or `models:/<name>/<n>`.

    The tracking URI is MLflow's current one (set it before calling).
    """
    import mlflow

    card = ModelCard.from_metadata(mlflow.models.get_model_info(model_uri).metadata)
    version = _registry_version(model_uri)
    with tempfile.TemporaryDirectory(prefix="imgcls-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        return load_keras(_find_keras_file(local)), card, version


def _registry_version(model_uri: str) -> str:
    """The registry version a `models:/` URI points at (alias looked up in the registry)."""
    from mlflow import MlflowClient

    ref = model_uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    return ref.rsplit("/", 1)[-1]


def _find_keras_file(folder: Path) -> Path:
    """The one `.keras` file inside a downloaded MLflow model (`data/model.keras`)."""
    found = sorted(folder.rglob("*.keras"))
    if not found:
        raise FileNotFoundError(f"no .keras file in the MLflow model at {folder}")
    return found[0]


def load_keras(path: str | Path) -> keras.Model:
    """Load a `.keras` file safely (no Lambda layers, no arbitrary code), not compiled."""
    import keras

    return keras.saving.load_model(path, safe_mode=True, compile=False)
