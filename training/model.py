"""Keras models: a frozen keras.applications backbone with a dense head, or the course CNN.

Every model takes raw RGB pixels 0-255 at its input size. Augmentation and the backbone's
own preprocessing are layers inside the graph, built from stock Keras layers only (no
`Lambda`), so the saved `.keras` file loads with `safe_mode=True` on any backend.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import keras
import numpy as np

from training.augment import layer_settings
from training.config import AugmentConfig, ConfigError, HeadConfig, TrainConfig

log = logging.getLogger(__name__)

# keras.applications VGG16/ResNet50 use "caffe" preprocessing: RGB -> BGR, minus the
# ImageNet channel means (in BGR order), no scaling.
_CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype="float32")
_APPLICATIONS = {"vgg16": "VGG16", "resnet50": "ResNet50"}
# The end of each backbone's second-to-last block, read beside the last with
# `backbone_blocks: last_two` (VGG16 6x6x512, ResNet50 6x6x1024 at 96 px).
_PREVIOUS_BLOCK = {"vgg16": "block4_pool", "resnet50": "conv4_block6_out"}
BACKBONE_STRIDE = 32  # both backbones' last map is the input size / 32
# `auto` reads the last two blocks when the last block's map is at most this many cells wide.
SMALL_LAST_MAP = 3


@dataclass(frozen=True)
class BlocksChoice:
    """Which backbone blocks the head reads, and why (logged as tag `backbone.blocks`)."""

    blocks: str  # "last" or "last_two"
    reason: str


def choose_blocks(config: TrainConfig) -> BlocksChoice:
    """The user's `backbone_blocks`, or the `auto` rule (docs/training.md: "What the head reads").

    Rule: the last block's map is input size / 32 cells wide; at 3x3 or smaller (inputs
    under 128 px), each cell of it sees most of the image and the map says little about
    where anything is, so the head also reads the block before (6x6 at 96 px). Both maps
    are average-pooled and L2-normalised (`two_block_features`).
    """
    if config.backbone == "simple_cnn":
        return BlocksChoice("last", "simple_cnn has no pretrained backbone")
    if config.backbone_blocks != "auto":
        return BlocksChoice(config.backbone_blocks, "set by the user (backbone_blocks, --backbone-blocks)")
    side = min(config.input_size) // BACKBONE_STRIDE
    cells = f"at {min(config.input_size)} px the last block's map is {side}x{side}"
    if side <= SMALL_LAST_MAP:
        return BlocksChoice("last_two", f"{cells}: the head also reads the block before it")
    return BlocksChoice("last", f"{cells}")


@dataclass
class ParamCounts:
    """Parameter counts the course teaches to read: total, trainable, frozen."""

    total: int
    trainable: int
    frozen: int


def build_model(config: TrainConfig, num_classes: int, heads: list[HeadConfig] | None = None) -> keras.Model:
    """The full classifier for `config`: raw pixels in, class probabilities out.

    With several `heads` (a search's best trials, training/ensemble.py) the head is their
    ensemble (`build_ensemble_head`); else it is `config.head`.
    """
    inputs = keras.Input(shape=(*config.input_size, 3), name="image")
    x = inputs
    if config.augment.active:
        x = build_augmentation(config.augment, config.seed)(x)
    if config.backbone == "simple_cnn":
        outputs = _simple_cnn_layers(x, num_classes)
    else:
        x = caffe_preprocessing()(x)
        backbone = build_backbone(
            config.backbone, config.weights_arg, config.input_size, choose_blocks(config).blocks
        )
        # training=False keeps BatchNorm in inference mode, also when fine-tuning later.
        x = backbone(x, training=False)
        shape = backbone.output.shape[1:]
        head = (
            build_ensemble_head(heads, shape, num_classes)
            if heads and len(heads) > 1
            else build_head(config.head, shape, num_classes)
        )
        outputs = head(x)
    return keras.Model(inputs, outputs, name=f"{config.backbone}_classifier")


def build_backbone(
    name: str, weights: str | None, input_size: tuple[int, int], blocks: str = "last"
) -> keras.Model:
    """A frozen keras.applications backbone without its top, named "backbone".

    `weights` is "imagenet" (downloaded by Keras), None (random) or a local weights file.
    `blocks="last_two"` ends it in `two_block_features` instead of its last map.
    """
    constructor = getattr(keras.applications, _APPLICATIONS[name])
    from_file = weights not in (None, "imagenet")
    try:
        backbone = constructor(
            include_top=False, weights=None if from_file else weights, input_shape=(*input_size, 3)
        )
    except Exception as exc:  # Keras raises a bare Exception when the download fails
        if weights != "imagenet":
            raise
        raise ConfigError(
            f"weights: could not get the ImageNet weights of {name} ({exc}); "
            "pass a local weights file with --weights PATH, or --weights none"
        ) from exc
    if from_file:
        try:
            load_weights_strictly(backbone, weights)
        except ValueError as exc:
            raise ConfigError(f"weights: {exc}") from exc
    if blocks == "last_two":
        backbone = two_block_features(backbone, _PREVIOUS_BLOCK[name])
    backbone.name = "backbone"
    backbone.trainable = False
    return backbone


def two_block_features(backbone: keras.Model, previous: str) -> keras.Model:
    """`backbone` ending in its last two blocks' features side by side, as a 1x1 map.

    Each block's map is average-pooled, L2-normalised (its scale differs per block: VGG16's
    block4 is ~14x block5) and multiplied by sqrt(channels), so each feature is about 1 in
    size whatever the block; the two vectors are concatenated and shaped (1, 1, C) so the
    head, its pooling and the feature cache treat it as any backbone's map. Stock layers,
    float32; the backbone's own layers are shared, so weights files and fine-tuning work
    on it as on the plain backbone.
    """
    parts = []
    for i, tensor in enumerate((backbone.get_layer(previous).output, backbone.output)):
        channels = int(tensor.shape[-1])
        x = keras.layers.GlobalAveragePooling2D(dtype="float32", name=f"blocks_pool_{i}")(tensor)
        x = keras.layers.UnitNormalization(dtype="float32", name=f"blocks_unit_{i}")(x)
        parts.append(
            keras.layers.Rescaling(math.sqrt(channels), dtype="float32", name=f"blocks_scale_{i}")(x)
        )
    x = keras.layers.Concatenate(dtype="float32", name="blocks_concat")(parts)
    x = keras.layers.Reshape((1, 1, int(x.shape[-1])), dtype="float32", name="blocks_map")(x)
    return keras.Model(backbone.input, x, name=backbone.name)


def load_weights_strictly(model: keras.Model, path: str) -> None:
    """Load a weights file and fail if any weight array did not come from it.

    Keras only warns when a file does not match the architecture and leaves those layers
    as they were; every weight is set to NaN first, so a half-loaded backbone is caught.
    """
    model.set_weights([np.full(w.shape, np.nan, dtype=w.dtype) for w in model.get_weights()])
    try:
        model.load_weights(path)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"weights file {path} does not fit {model.name}: {exc}") from exc
    missing = sum(bool(np.isnan(w).any()) for w in model.get_weights())
    if missing:
        raise ValueError(
            f"weights file {path} does not fit {model.name}: {missing} of "
            f"{len(model.get_weights())} weight arrays were not in it"
        )


def caffe_preprocessing() -> keras.layers.Layer:
    """VGG16/ResNet50 `preprocess_input` as a frozen 1x1 convolution (channel swap + mean).

    Exact: each output is one input times 1.0 plus a bias. Kept in float32 under mixed
    precision so the ImageNet means are not rounded.
    """
    swap = np.zeros((1, 1, 3, 3), dtype="float32")
    for out_channel, in_channel in enumerate((2, 1, 0)):
        swap[0, 0, in_channel, out_channel] = 1.0
    layer = keras.layers.Conv2D(3, 1, name="caffe_preprocess", trainable=False, dtype="float32")
    layer.build((None, None, None, 3))
    layer.set_weights([swap, -_CAFFE_BGR_MEAN])
    return layer


def build_augmentation(config: AugmentConfig, seed: int) -> keras.Sequential:
    """Random flip/rotation/zoom/contrast/translation of the config's preset (fields set
    explicitly override it); identity at inference time."""
    s = layer_settings(config)
    layers: list[keras.layers.Layer] = []
    if s["flip"] != "none":
        layers.append(keras.layers.RandomFlip(s["flip"], seed=seed))
    if s["rotation"]:
        layers.append(keras.layers.RandomRotation(s["rotation"], seed=seed))
    if s["zoom"]:
        layers.append(keras.layers.RandomZoom(s["zoom"], seed=seed))
    if s["translation"]:
        layers.append(keras.layers.RandomTranslation(s["translation"], s["translation"], seed=seed))
    if s["contrast"]:
        # value_range: the model sees raw 0-255 pixels here.
        layers.append(keras.layers.RandomContrast(s["contrast"], value_range=(0, 255), seed=seed))
    return keras.Sequential(layers, name="augmentation")


def build_head(
    config: HeadConfig, feature_shape, num_classes: int, name: str = "head", probabilities: bool = True
) -> keras.Sequential:
    """The trainable classifier on top of backbone features (a sub-model named "head").

    `probabilities=False`: it ends at its Dense `logits` (an ensemble's member).
    """
    layers: list[keras.layers.Layer] = [keras.Input(shape=tuple(feature_shape))]
    pooling = {
        "avg": keras.layers.GlobalAveragePooling2D,
        "max": keras.layers.GlobalMaxPooling2D,
        "flatten": keras.layers.Flatten,
    }[config.pooling]
    layers.append(pooling(name="pool"))
    for i, units in enumerate(config.dense_units):
        layers.append(keras.layers.Dense(units, activation="relu", name=f"dense_{i}"))
        if config.dropout:
            layers.append(keras.layers.Dropout(config.dropout, name=f"dropout_{i}"))
    ending = classifier_end(num_classes)
    layers.extend(ending if probabilities else ending[:1])
    return keras.Sequential(layers, name=name)


def build_ensemble_head(heads: list[HeadConfig], feature_shape, num_classes: int) -> keras.Model:
    """Several heads on the same backbone features, averaged: the sub-model named "head".

    Each member `member_<i>` ends at its own logits; an `Average` of them then goes through
    the one temperature and softmax of `classifier_end`, so calibration and `safe_mode`
    loading see the same stock layers as a single head's.
    """
    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    logits = [
        build_head(head, feature_shape, num_classes, name=f"member_{i}", probabilities=False)(inputs)
        for i, head in enumerate(heads)
    ]
    x = keras.layers.Average(dtype="float32", name="average_logits")(logits)
    for layer in classifier_end(num_classes)[1:]:
        x = layer(x)
    return keras.Model(inputs, x, name="head")


def ensemble_members(model: keras.Model) -> list[keras.Model]:
    """The member heads of a model whose head is an ensemble; [] for a single head."""
    names = [layer.name for layer in model.layers]
    if "head" not in names:
        return []
    head = model.get_layer("head")
    return [layer for layer in head.layers if layer.name.startswith("member_")]


def classifier_end(num_classes: int) -> list[keras.layers.Layer]:
    """Logits, temperature, softmax: Dense `logits` -> Rescaling `temperature` -> `probs`.

    The temperature divides the logits (scale 1/T; 1 until training/calibrate.py fits it),
    so the saved model emits calibrated probabilities with stock layers only. Models saved
    before it end in a Dense `probs` with the softmax built in; they load as they are.
    float32: softmax under mixed precision stays numerically sound.
    """
    return [
        keras.layers.Dense(num_classes, dtype="float32", name="logits"),
        keras.layers.Rescaling(1.0, dtype="float32", name="temperature"),
        keras.layers.Activation("softmax", dtype="float32", name="probs"),
    ]


def _simple_cnn_layers(x, num_classes: int):
    """The course's small CNN: 81,200 parameters on 28x28 greyscale (81,488 on RGB)."""
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(32, 2, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(50, activation="relu", name="dense")(x)
    for layer in classifier_end(num_classes):
        x = layer(x)
    return x


def head_summary(model: keras.Model, blocks: str, cross_fitted: bool = False) -> str | None:
    """The classifier on the backbone in words, for the model card: "5 heads averaged on
    the last two blocks" ("5 cross-fitted heads ...": training/folds.py); None without a
    backbone (simple_cnn)."""
    if "backbone" not in [layer.name for layer in model.layers]:
        return None
    members = len(ensemble_members(model))
    kind = "cross-fitted heads" if cross_fitted else "heads"
    heads = f"{members} {kind} averaged" if members else "one dense head"
    return f"{heads} on the {'last two blocks' if blocks == 'last_two' else 'last block'}"


def feature_extractor(model: keras.Model) -> keras.Model | None:
    """Input -> frozen backbone features (no augmentation), sharing the model's layers.

    Used to cache features; None if the model has no backbone (simple_cnn).
    """
    names = [layer.name for layer in model.layers]
    if "backbone" not in names:
        return None
    inputs = keras.Input(shape=model.input_shape[1:], name="image")
    x = inputs
    for layer in model.layers[1 : names.index("head")]:
        if layer.name != "augmentation":
            x = layer(x, training=False)
    return keras.Model(inputs, x, name="feature_extractor")


def unfreeze_top(model: keras.Model, layers: int) -> int:
    """Make the top `layers` backbone layers trainable (BatchNorm stays frozen); returns count."""
    backbone = model.get_layer("backbone")
    backbone.trainable = True
    weighted = [layer for layer in backbone.layers if layer.weights]
    for layer in backbone.layers:
        layer.trainable = False
    opened = 0
    for layer in weighted[-layers:]:
        if not isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = True
            opened += 1
    return opened


def count_params(model: keras.Model) -> ParamCounts:
    """Total, trainable and frozen parameter counts."""
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return ParamCounts(total=trainable + frozen, trainable=trainable, frozen=frozen)


def model_summary(model: keras.Model) -> str:
    """Keras' summary (expanded nested models) as text."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line), expand_nested=True)
    return "\n".join(lines)
