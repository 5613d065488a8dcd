"""Copy a champion into the BentoML model store, so the service runs without MLflow.

The store mirrors the alias: the entry of the current champion carries the label
`alias=<alias>`. A promotion downloads the model first (slow, outside the registry lock),
and saves the entry only once the alias write has succeeded, then deletes the
entries of earlier champions (registry/steps.py); the next command's reconcile repairs a
store a crash left behind (registry/reconcile.py plans it, registry/steps.py carries it out).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imgcls import parity
from registry.settings import RegistrySettings
from registry.versions import download_keras_file, version_card

log = logging.getLogger(__name__)


@dataclass
class Download:
    """A registry version's `.keras` file, card and parity set, fetched ahead of the alias move."""

    version: str
    keras_path: Path
    card: object  # imgcls.modelcard.ModelCard
    parity_path: Path | None = None  # None: registered before parity sets were stored


@contextlib.contextmanager
def downloaded(settings: RegistrySettings, version: str) -> Iterator[Download]:
    """Fetch registry `version` into a temporary folder for the block."""
    card = version_card(settings, version)
    with tempfile.TemporaryDirectory(prefix="imgcls-bento-") as tmp:
        keras_path = download_keras_file(settings, version, Path(tmp))
        yield Download(version, keras_path, card, parity.find(Path(tmp)))


def save_champion(settings: RegistrySettings, download: Download) -> str:
    """Save a downloaded version into the store at BENTOML_HOME, labelled as the champion."""
    from service.store import ALIAS_LABEL, REGISTERED_LABEL, save_to_bento_store

    return save_to_bento_store(
        download.keras_path,
        download.card,
        name=settings.bento_model_name,
        version=download.version,
        extra_labels={REGISTERED_LABEL: settings.model_name, ALIAS_LABEL: settings.alias},
        parity_path=download.parity_path,
    )


def champion_labels(settings: RegistrySettings) -> tuple[tuple[str, str | None], ...]:
    """(tag, registry version) of this model's entries labelled champion, newest first."""
    from service.store import VERSION_LABEL, champion_entries

    entries = champion_entries(settings.bento_model_name, settings.alias, settings.model_name)
    return tuple((str(m.tag), m.info.labels.get(VERSION_LABEL)) for m in entries)


def retire_earlier_champions(settings: RegistrySettings, keep: str) -> None:
    """Delete this model's entries labelled champion other than `keep` (best effort)."""
    import bentoml

    from service.store import champion_entries

    for model in champion_entries(settings.bento_model_name, settings.alias, settings.model_name):
        if str(model.tag) != keep:
            try:
                bentoml.models.delete(str(model.tag))
            except Exception:  # noqa: BLE001 - the newest champion entry is served anyway
                log.warning("could not delete the earlier champion %s", model.tag, exc_info=True)
