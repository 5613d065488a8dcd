"""Copy a champion into the BentoML model store, so the service runs without MLflow."""

from __future__ import annotations

import tempfile
from pathlib import Path

from registry.register import download_keras_file, version_card
from registry.settings import RegistrySettings


def import_champion(settings: RegistrySettings, version: str) -> str:
    """Save registry `version` into the store at BENTOML_HOME; returns the BentoML tag.

    The BentoML model is labelled with the registry version and the registered name.
    """
    from service.store import save_to_bento_store

    card = version_card(settings, version)
    with tempfile.TemporaryDirectory(prefix="imgcls-bento-") as tmp:
        keras_path = download_keras_file(settings, version, Path(tmp))
        return save_to_bento_store(
            keras_path,
            card,
            name=settings.bento_model_name,
            version=version,
            extra_labels={"registered_model": settings.model_name, "alias": settings.alias},
        )
