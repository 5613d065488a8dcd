"""Where the served champion comes from, for the follower: the MLflow registry or a BentoML store.

- `MlflowSource` follows `models:/<name>@<alias>`: it resolves the alias to a version
  once per poll and loads that exact version (`models:/<name>/<N>`), so the card and the
  weights always come from the same version. Every loaded version is kept in a local
  cache, so a restart while MLflow is unreachable still serves the last champion.
- `BentoSource` follows the entry the registry labelled `alias=<alias>` in the local
  BentoML store (the registry writes that label on each promotion and rollback).

`--version N` pins either source to one registry version: it never follows.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from imgcls import parity
from imgcls.modelcard import ModelCard
from service.compiled import build_folder, compile_verified
from service.follower import Follower, Served, prepare
from service.predictor import Predictor

logger = logging.getLogger(__name__)

CHAMPION_FILE = "champion.json"
# Versions kept in the local cache: the champion and the one before it (a rollback).
CACHED_VERSIONS = 2


class MlflowSource:
    """The champion alias of a registered model, with a local cache of loaded versions."""

    kind = "mlflow"

    def __init__(self, name: str, alias: str, cache_dir: Path, pinned: str | None = None, max_pixels=None,
                 runtime: str = "auto", precision: str = "auto"):  # fmt: skip
        self.name, self.alias, self.pinned = name, alias, pinned
        self.cache = ModelCache(cache_dir / _safe(name))
        self._max_pixels = max_pixels
        self.runtime, self.precision = runtime, precision

    def champion(self) -> str:
        if self.pinned:
            return self.pinned
        from mlflow import MlflowClient

        return str(MlflowClient().get_model_version_by_alias(self.name, self.alias).version)

    def load(self, key: str) -> Predictor:
        import mlflow

        from service.store import load_keras

        uri = f"models:/{self.name}/{key}"
        card = ModelCard.from_metadata(mlflow.models.get_model_info(uri).metadata)
        with tempfile.TemporaryDirectory(prefix="imgcls-model-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
            keras_file = self.cache.put(key, _find_keras_file(local), card, parity.find(local))
        return self._predictor(load_keras(keras_file), card, key)

    def compile(self, key: str, predictor: Predictor) -> None:
        """The version's build, kept in its cache folder (pruned with it)."""
        folder = self.cache.root / _safe(key)
        compile_verified(predictor, self.runtime, self.precision, build_folder(folder),
                         parity.load(folder / parity.PARITY_FILE))  # fmt: skip

    def load_cached(self) -> Predictor | None:
        """The last champion this cache saw (None if it holds nothing usable)."""
        found = self.cache.champion(self.pinned)
        if found is None:
            return None
        from service.store import load_keras

        version, path, card = found
        return self._predictor(load_keras(path), card, version)

    def _predictor(self, model: Any, card: ModelCard, version: str) -> Predictor:
        extra = {} if self._max_pixels is None else {"max_pixels": self._max_pixels}
        return Predictor(model, card, version, name=self.name, **extra)


class BentoSource:
    """The entry of the local BentoML store labelled as the champion (or an exact tag)."""

    kind = "bentoml"

    def __init__(self, bento_name: str, alias: str, registered: str, tag: str | None = None,
                 pinned: str | None = None, max_pixels=None, cache_dir: Path | None = None,
                 runtime: str = "auto", precision: str = "auto"):  # fmt: skip
        self.bento_name, self.alias, self.registered = bento_name, alias, registered
        self.tag, self.pinned, self._max_pixels = tag, pinned, max_pixels
        self.runtime, self.precision = runtime, precision
        # The store keeps the models; the builds of its entries live in the serve cache.
        self.builds = None if cache_dir is None else Path(cache_dir) / "bentoml" / _safe(bento_name)

    def champion(self) -> str:
        import bentoml

        from service.store import VERSION_LABEL, champion_tag

        if self.tag:
            return str(bentoml.models.get(self.tag).tag)
        if self.pinned:
            for model in bentoml.models.list(self.bento_name):
                if model.info.labels.get(VERSION_LABEL) == self.pinned:
                    return str(model.tag)
            raise LookupError(f"no {self.bento_name} entry of registry version {self.pinned} in the store")
        return str(bentoml.models.get(champion_tag(self.bento_name, self.alias, self.registered)).tag)

    def load(self, key: str) -> Predictor:
        from service.store import load_from_bento_store

        model, card, version = load_from_bento_store(key)
        extra = {} if self._max_pixels is None else {"max_pixels": self._max_pixels}
        return Predictor(model, card, version, name=self.registered, **extra)

    def compile(self, key: str, predictor: Predictor) -> None:
        """The entry's build, kept per entry under the serve cache (the last two entries)."""
        import bentoml

        folder = None
        if self.builds is not None:
            folder = self.builds / _safe(key.rsplit(":", 1)[-1])
            folder.mkdir(parents=True, exist_ok=True)
            os.utime(folder)  # the newest is kept by _prune
            _prune(self.builds, keep=folder.name)
        entry = Path(bentoml.models.get(key).path_of(parity.PARITY_FILE))
        built = None if folder is None else build_folder(folder)
        compile_verified(predictor, self.runtime, self.precision, built, parity.load(entry))


class ModelCache:
    """Loaded versions on local disk: `<root>/<version>/{model.keras,card.json,parity.npz}`,
    with the version's compiled build beside them (`openvino-<release>/`)."""

    def __init__(self, root: Path):
        self.root = root

    def put(self, version: str, keras_file: Path, card: ModelCard, parity_file: Path | None = None) -> Path:
        """Keep a copy of `keras_file` (and the version's parity set) as `version` and mark
        it the champion; its path."""
        final = self.root / _safe(version)
        if not (final / "model.keras").exists():
            self.root.mkdir(parents=True, exist_ok=True)
            partial = Path(tempfile.mkdtemp(prefix=f".{_safe(version)}-", dir=self.root))
            shutil.copyfile(keras_file, partial / "model.keras")
            (partial / "card.json").write_text(card.model_dump_json())
            if parity_file is not None:
                shutil.copyfile(parity_file, partial / parity.PARITY_FILE)
            try:
                os.replace(partial, final)  # atomic: another worker may have cached it first
            except OSError:
                shutil.rmtree(partial, ignore_errors=True)
        elif parity_file is not None and not (final / parity.PARITY_FILE).exists():
            # cached before parity sets were stored
            tmp = final / f".{parity.PARITY_FILE}.{os.getpid()}"
            shutil.copyfile(parity_file, tmp)
            os.replace(tmp, final / parity.PARITY_FILE)
        self._point_at(version)
        _prune(self.root, keep=_safe(version))
        return final / "model.keras"

    def champion(self, version: str | None = None) -> tuple[str, Path, ModelCard] | None:
        """(version, .keras path, card) of `version`, or of the last champion cached."""
        try:
            version = version or json.loads((self.root / CHAMPION_FILE).read_text())["version"]
            folder = self.root / _safe(version)
            card = ModelCard.model_validate_json((folder / "card.json").read_text())
        except (OSError, ValueError, KeyError):
            return None
        return version, folder / "model.keras", card

    def _point_at(self, version: str) -> None:
        tmp = self.root / f".{CHAMPION_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps({"version": version}))
        os.replace(tmp, self.root / CHAMPION_FILE)


def _prune(root: Path, keep: str) -> None:
    """Keep `keep` and the newest other folder of `root` (a rollback); delete the rest."""
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in folders if p.name != keep][CACHED_VERSIONS - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def build_follower(settings: Any, metrics: Any = None) -> Follower:
    """Load the configured champion, warmed up, inside a `Follower` of its source.

    `settings` is a `service.settings.ServiceSettings`. With `--source mlflow`, a registry
    that cannot be reached at start-up falls back to the local cache (origin "cache").
    """
    source = make_source(settings)
    interval = 0.0 if (settings.version or settings.bento_tag) else settings.poll_interval_s
    try:
        key = source.champion()
        served = Served(prepare(source.load(key), source, key), key, source.kind)
    except Exception as exc:
        if not isinstance(source, MlflowSource):
            raise
        served = _from_cache(source, exc)
    return Follower(source, served, interval, metrics)


def load_predictor(settings: Any) -> Predictor:
    """The configured champion (BentoML store or MLflow registry), checked and warmed up.

    `settings` is a `service.settings.ServiceSettings`; the running service keeps the same
    load inside its `Follower` (`build_follower`), equal to the registry's.
    """
    return build_follower(settings).served.predictor


def _from_cache(source: MlflowSource, exc: Exception) -> Served:
    cached = source.load_cached()
    if cached is None:
        raise RuntimeError(f"cannot load {source.name}@{source.alias} and no local copy is cached") from exc
    logger.warning(
        "the registry cannot be reached (%s): serving the cached version %s until it can", exc, cached.version
    )
    return Served(prepare(cached, source, cached.version), cached.version, "cache")


def make_source(settings: Any):
    """The source the settings name: MLflow registry or BentoML store."""
    from imgcls.settings import TrackingSettings

    cache = Path(settings.cache_dir or TrackingSettings().home / "serve-cache")
    # The OpenVINO build runs on the CPU: with a GPU declared, auto leaves Keras on the GPU.
    runtime = "keras" if settings.gpu and settings.runtime == "auto" else settings.runtime
    compiled = {"runtime": runtime, "precision": settings.precision}
    if settings.source == "mlflow":
        _connect_mlflow(TrackingSettings().resolved_tracking_uri())
        return MlflowSource(settings.model_name, settings.alias, cache, settings.version,
                            settings.max_pixels, **compiled)  # fmt: skip
    return BentoSource(settings.bento_model_name or settings.model_name, settings.alias,
                       settings.model_name, settings.bento_tag, settings.version, settings.max_pixels,
                       cache, **compiled)  # fmt: skip


def _connect_mlflow(uri: str) -> None:
    import mlflow

    # A poll must fail fast when the server is down: MLflow's defaults retry one request
    # for minutes (7 retries, 120 s each). The follower retries on its next poll anyway.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def _find_keras_file(folder: Path) -> Path:
    """The one `.keras` file inside a downloaded MLflow model (`data/model.keras`)."""
    found = sorted(folder.rglob("*.keras"))
    if not found:
        raise FileNotFoundError(f"no .keras file in the MLflow model at {folder}")
    return found[0]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
