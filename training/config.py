"""The typed configuration of a training run: one pydantic model, validated at start.

A YAML file (`--config run.yaml`) gives any subset of fields; command-line options
override it; everything else takes the defaults below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Backbone = Literal["vgg16", "resnet50", "simple_cnn"]

# Input sizes the backbones were trained at; any size >= 32 works for the convolutions.
DEFAULT_IMAGE_SIZE = {"vgg16": 224, "resnet50": 224, "simple_cnn": 28}


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Why heads are not cross-fitted under tf.distribute (here and in training/folds.py).
DISTRIBUTED_FOLDS = "under --distribute the replicas split each held-out fold's batches unevenly"


class AugmentConfig(_Strict):
    """Random augmentation layers inside the graph (active only while training).

    `preset` gives the layer settings (training/augment.py); `auto` picks one from the
    scanned images and the backbone. A field set here (None = the preset's) overrides it.
    """

    enabled: bool = True
    preset: Literal["auto", "photo", "orientation_bound", "none"] = "auto"
    flip: Literal["horizontal", "vertical", "horizontal_and_vertical", "none"] | None = None
    rotation: float | None = Field(None, ge=0, le=0.5, description="fraction of a full turn")
    zoom: float | None = Field(None, ge=0, lt=1)
    contrast: float | None = Field(None, ge=0, lt=1)
    translation: float | None = Field(None, ge=0, lt=1)

    @property
    def active(self) -> bool:
        """Whether the model gets augmentation layers."""
        return self.enabled and self.preset != "none"


class HeadConfig(_Strict):
    """The dense classifier put on top of the backbone."""

    pooling: Literal["avg", "max", "flatten"] = "avg"
    dense_units: list[int] = Field(default_factory=lambda: [256])
    dropout: float = Field(0.3, ge=0, lt=1)

    @field_validator("dense_units")
    @classmethod
    def _positive_units(cls, units: list[int]) -> list[int]:
        if any(u < 1 for u in units):
            raise ValueError("every dense layer needs at least 1 unit")
        return units


class FineTuneConfig(_Strict):
    """Optional second phase: unfreeze the top of the backbone at a low learning rate."""

    unfreeze_layers: int = Field(0, ge=0, description="top backbone layers to unfreeze; 0 = off")
    epochs: int = Field(5, ge=1)
    # 100x below the usual head rate, so pretrained filters move slowly.
    learning_rate: float = Field(1e-5, gt=0, lt=1)


class TrainConfig(_Strict):
    """Everything that defines a training run; logged in full as MLflow params."""

    data: Path
    backbone: Backbone = "vgg16"
    weights: str = Field("imagenet", description="'imagenet', 'none' or a local weights file")
    image_size: int | None = Field(None, ge=8, le=1024, description="default: the backbone's")
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float = Field(1e-3, gt=0, lt=1)
    seed: int = 42
    # Validation steers early stopping and the learning-rate schedule: it gets at least
    # this share of each class and at least `val_min_per_class` images of it (up to 30%
    # of the class), so a few dozen images do not decide when training stops.
    val_fraction: float = Field(0.2, gt=0, lt=0.5)
    val_min_per_class: int = Field(30, ge=0, le=10_000)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    # What the head reads (training/model.py): the last block's feature map ("last"), or
    # the last two blocks' maps, each average-pooled and L2-normalised, side by side
    # ("last_two"); auto: last_two when the last block's map is 3x3 or smaller.
    backbone_blocks: Literal["auto", "last", "last_two"] = "auto"
    fine_tune: FineTuneConfig = Field(default_factory=FineTuneConfig)
    early_stopping_patience: int = Field(5, ge=1)
    reduce_lr_patience: int = Field(2, ge=1)
    class_weight: Literal["none", "balanced"] = "none"
    cache_features: bool = Field(True, description="run a frozen backbone once when not augmenting")
    # Augmented copies of the training set the frozen backbone runs over once; the head's
    # epochs cycle through their cached features. None = auto (training/features.py:
    # as many as fit features.BACKBONE_PASS_BUDGET, at least 1, with a frozen backbone and
    # augmentation on); 0 = live
    # augmentation, one backbone pass per epoch.
    augment_passes: int | None = Field(None, ge=0, le=50)
    # Head configurations tried on the cached features before the run's model is trained
    # (training/search.py); 0 = no search, the head as configured.
    search: int = Field(0, ge=0, le=500)
    # With a search: the heads of its best K trials (on validation), each trained with its
    # own configuration, are averaged in the saved model (training/ensemble.py); 1 = the
    # best trial alone. Without a search: K copies of the configured head, cross-fitted
    # (ensemble_fit below; one head where folds do not apply).
    search_ensemble: int = Field(5, ge=1, le=50)
    # How those heads are trained (training/folds.py): "folds" splits train + validation
    # into K folds, and head i trains on the others and stops early on fold i; "train"
    # trains every head on the training split and stops it on validation. auto: folds when
    # each head then sees more images than the training split holds and the backbone stays
    # frozen (fine-tuning validates on the validation split).
    ensemble_fit: Literal["auto", "folds", "train"] = "auto"
    # Decoupled weight decay (AdamW) and label smoothing of the head phase; 0 = plain Adam
    # and cross-entropy. The search tunes both.
    weight_decay: float = Field(0.0, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    distribute: Literal["none", "mirrored", "multi_worker"] = "none"
    mixed_precision: Literal["auto", "on", "off"] = Field("auto", description="auto: on GPU only")
    # A largest/smallest class ratio above this is reported as heavy imbalance.
    imbalance_ratio_warning: float = Field(10.0, ge=1)

    @field_validator("weights")
    @classmethod
    def _known_weights(cls, weights: str) -> str:
        if weights in ("imagenet", "none"):
            return weights
        if not Path(weights).is_file():
            raise ValueError(f"weights file not found: {weights} (or use 'imagenet' / 'none')")
        return weights

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.backbone == "simple_cnn" and self.fine_tune.unfreeze_layers:
            raise ValueError("fine_tune.unfreeze_layers: simple_cnn is fully trainable already")
        if self.backbone != "simple_cnn" and self.image_size is not None and self.image_size < 32:
            raise ValueError(f"image_size: {self.backbone} needs at least 32 pixels")
        if self.backbone == "simple_cnn" and self.backbone_blocks == "last_two":
            raise ValueError("backbone_blocks: simple_cnn has no pretrained backbone blocks to read")
        if self.backbone == "simple_cnn" and self.search:
            raise ValueError("search: simple_cnn has no frozen backbone whose features a search could reuse")
        if self.backbone == "simple_cnn" and self.augment_passes:
            raise ValueError("augment_passes: simple_cnn has no frozen backbone to cache; it augments live")
        if not self.cache_features and (self.search or self.augment_passes):
            field = "search" if self.search else "augment_passes"
            raise ValueError(f"{field}: needs cached backbone features (cache_features: true)")
        if self.search and self.augment_passes == 0 and self.augment.active:
            raise ValueError("search: needs cached features; live augmentation (augment_passes: 0) has none")
        if self.search and self.augment.active and self.distribute != "none":
            raise ValueError("search: augmentation under --distribute is live, with no cached features")
        if self.augment_passes and self.distribute != "none":
            raise ValueError("augment_passes: cached augmented passes run without --distribute only")
        if self.augment_passes and not self.augment.active:
            raise ValueError("augment_passes: augmentation is off (augment.enabled: false or preset none)")
        if self.ensemble_fit == "folds" and self.fine_tune.unfreeze_layers:
            raise ValueError(
                "ensemble_fit: folds trains the heads on the validation images that fine-tuning "
                "then stops on; use train (or auto) with fine_tune.unfreeze_layers"
            )
        if self.ensemble_fit == "folds" and (obstacle := self._no_folds()):
            raise ValueError(f"ensemble_fit: folds: {obstacle}; use auto or train")
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError("val_fraction + test_fraction leave too little data to train on")
        return self

    def _no_folds(self) -> str | None:
        """What keeps a run of this config from cross-fitting its heads, known before the
        data is read (training/folds.py checks the rest on the cached features)."""
        if self.backbone == "simple_cnn":
            return "simple_cnn has no frozen backbone whose cached features the heads could share"
        if not self.cache_features:
            return "the heads train on cached backbone features (cache_features: true)"
        if self.augment_passes == 0 and self.augment.active:
            return "live augmentation (augment_passes: 0) has no cached features"
        if self.distribute != "none":
            return DISTRIBUTED_FOLDS
        if self.search_ensemble < 2 or self.search == 1:
            return "one head (search_ensemble 1 or search 1) has nothing to cross-fit"
        if not self.search and len(self.head.dense_units) > 1:
            return "the copies' trainer takes one dense layer at most (head.dense_units)"
        return None

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        size = self.image_size or DEFAULT_IMAGE_SIZE[self.backbone]
        return (size, size)

    @property
    def weights_arg(self) -> str | None:
        """The value for keras.applications' `weights=` argument."""
        return None if self.weights == "none" else self.weights

    def flat_params(self) -> dict[str, str]:
        """The resolved config as flat `a.b` keys, for MLflow params."""
        return dict(_flatten(self.model_dump(mode="json") | {"image_size": self.input_size[0]}))


def _flatten(tree: dict[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", str(value)


def load_config(path: Path | None = None, **overrides: Any) -> TrainConfig:
    """Build a TrainConfig from an optional YAML file plus overrides (None = not given).

    Raises ConfigError whose message names each bad field and the file.
    """
    values: dict[str, Any] = _read_yaml(path) if path else {}
    for key, value in overrides.items():
        if value is not None:
            _set_dotted(values, key, value)
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        source = f" in {path}" if path else ""
        lines = [f"  {'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"invalid training config{source}:\n" + "\n".join(lines)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must be a mapping of field: value")
    return values


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        values = values.setdefault(part, {})
    values[leaf] = value
