"""Frozen-backbone features computed once per run, and the head trained on them.

A frozen backbone gives the same features every epoch, so it runs once per split and the
head trains on the cached (un-pooled) feature maps. With augmentation on, it runs over
`augment_passes` augmented copies of the training set instead, once; the head's epochs
cycle through those copies (epoch e sees copy e mod K). An augmented run then costs K
backbone passes over the training images, not one per epoch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import keras
import numpy as np

from training.config import TrainConfig

log = logging.getLogger(__name__)

# The backbone's share of an augmented run's time budget, in passes over all its images
# (train, validation, test): `auto` makes as many augmented copies of train as fit in it,
# at least one. The rest of the 2x target is the run's other work (writing the
# split images, the head's epochs, evaluation pictures, saving the model).
BACKBONE_PASS_BUDGET = 1.5
# The cached feature maps of all passes stay in memory below this size; above it, fewer
# passes are made (at least one).
FEATURE_CACHE_BUDGET_BYTES = 3 * 1024**3


@dataclass
class FeatureCache:
    """Backbone feature maps (n, h, w, c) of each training pass, and of validation.

    `train_x[k]`/`train_y[k]` are pass k; one clean pass when the run does not augment.
    The passes share one order when the splits give it (`Splits.train_in_order`): row r of
    every pass is then the same image (`aligned`). `seconds` is the wall-clock time of the
    backbone passes.
    """

    train_x: list[np.ndarray]
    train_y: list[np.ndarray]
    val_x: np.ndarray
    val_y: np.ndarray
    seconds: float
    aligned: bool = False

    @property
    def passes(self) -> int:
        return len(self.train_x)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.val_x.shape[1:])


def resolve_passes(config: TrainConfig, split_sizes: dict[str, int]) -> TrainConfig:
    """`config` with `augment_passes` made explicit (after the augmentation preset is):
    0 for live augmentation or none at all, else the user's K or `auto_passes`."""
    if config.augment_passes is not None and (config.augment_passes == 0 or config.augment.active):
        return config
    # Under a tf.distribute strategy Keras splits the cycled passes' batches unevenly across
    # replicas (a gradient sum of mismatched shapes): those runs augment live.
    cached = config.augment.active and config.cache_features and config.backbone != "simple_cnn"
    cached = cached and config.distribute == "none"
    return config.model_copy(update={"augment_passes": auto_passes(split_sizes) if cached else 0})


def auto_passes(split_sizes: dict[str, int]) -> int:
    """Augmented copies of train that keep K*train + val + test within BACKBONE_PASS_BUDGET
    passes over all images; at least 1. Train/val/test 700/300/200 gives 1, 500/100/2000 gives 3."""
    train = max(1, split_sizes["train"])
    budget = BACKBONE_PASS_BUDGET * sum(split_sizes.values()) - split_sizes["val"] - split_sizes["test"]
    return max(1, int(budget // train))


def passes_reason(config: TrainConfig) -> str:
    """Why the run augments the way it does, in words (logged as tag augment.passes)."""
    if not config.augment.active:
        return (
            "no augmentation: the frozen backbone runs once per split"
            if config.backbone != "simple_cnn"
            else "no augmentation"
        )
    if config.backbone == "simple_cnn":
        return "live augmentation (simple_cnn trains end to end)"
    if not config.augment_passes and config.distribute != "none":
        return "live augmentation: the backbone runs every epoch (under --distribute)"
    if not config.augment_passes:
        return "live augmentation: the backbone runs every epoch (augment_passes: 0)"
    return (
        f"{config.augment_passes} augmented copies of the training set through the frozen "
        f"{config.backbone} once, the head's epochs cycle through their cached features"
    )


def uses_cache(config: TrainConfig, has_backbone: bool) -> bool:
    """Whether the head phase trains on cached features (else the backbone runs live)."""
    return (
        has_backbone and config.cache_features and (not config.augment.active or bool(config.augment_passes))
    )


def backbone_function(extractor: keras.Model, augmentation: keras.Layer | None = None):
    """The frozen backbone (after `augmentation` in training mode, when given) as one
    tf.function for every pass that needs it.

    Its input signature fixes all but the batch dimension, so it is traced once: the short
    last batch and the later passes reuse that graph. (A tf.function made per pass, traced
    again for each last batch, made TensorFlow warn of "tf.function retracing" on every
    augmented photo run: it counts the traces of all functions made from the same code.)
    """
    import tensorflow as tf

    def forward(images):
        if augmentation is not None:
            images = augmentation(images, training=True)
        return extractor(images, training=False)

    spec = tf.TensorSpec((None, *extractor.input_shape[1:]), tf.float32)
    return tf.function(forward, input_signature=[spec])


def run_backbone(forward, dataset, progress=None):
    """Features and labels of a whole dataset through `forward` (`backbone_function`), in
    one pass (so they stay aligned even when the dataset reshuffles per iteration);
    `progress` (imgcls/progress.py) advances by each batch's images."""
    import tensorflow as tf

    xs, ys = [], []
    for images, labels in dataset:
        xs.append(np.asarray(forward(tf.cast(images, tf.float32))))
        ys.append(np.asarray(labels))
        if progress is not None:
            progress.advance(len(ys[-1]))
    return np.concatenate(xs), np.concatenate(ys)


def backbone_features(extractor: keras.Model, dataset, augmentation: keras.Layer | None = None):
    """Backbone features and labels of a whole dataset, in one pass; with `augmentation`,
    each batch goes through it (in training mode) first."""
    return run_backbone(backbone_function(extractor, augmentation), dataset)


def compute_cache(
    model: keras.Model, extractor: keras.Model, splits, config: TrainConfig, train_images: int
) -> FeatureCache:
    """Run the frozen backbone over validation and over the training passes, once, with
    progress on the terminal or in the log."""
    from imgcls.progress import Progress

    start = time.perf_counter()
    augmentation = model.get_layer("augmentation") if config.augment.active else None
    map_bytes = int(np.prod(extractor.output_shape[1:])) * 4  # one image's float32 feature map
    passes = _affordable_passes(config.augment_passes, train_images * map_bytes) if augmentation else 1
    val_images = splits.images.get("val")
    total = None if val_images is None else val_images + passes * train_images
    clean = backbone_function(extractor)
    forward = backbone_function(extractor, augmentation) if augmentation else clean
    in_order = splits.train_in_order
    train_x, train_y = [], []
    with Progress(f"{config.backbone} backbone pass", total, logger=log) as progress:
        val_x, val_y = run_backbone(clean, splits.val, progress)
        for _ in range(passes):
            x, y = run_backbone(forward, splits.train if in_order is None else in_order, progress)
            train_x.append(x)
            train_y.append(y)
    aligned = (in_order is not None or passes == 1) and all(np.array_equal(y, train_y[0]) for y in train_y)
    cache = FeatureCache(train_x, train_y, val_x, val_y, time.perf_counter() - start, aligned)
    log.info(
        "cached backbone features: train %d x %s, val %s (%.1f s)",
        passes,
        train_x[0].shape,
        val_x.shape,
        cache.seconds,
    )
    return cache


def _affordable_passes(wanted: int, bytes_per_pass: int) -> int:
    """`wanted` passes, or fewer (at least one) when their features would not fit the budget."""
    passes = max(1, min(wanted, FEATURE_CACHE_BUDGET_BYTES // max(1, bytes_per_pass)))
    if passes < wanted:
        log.warning(
            "augment_passes: %d augmented copies would not fit %.0f GiB of cached features; making %d",
            wanted,
            FEATURE_CACHE_BUDGET_BYTES / 1024**3,
            passes,
        )
    return passes


def fit_head(
    head: keras.Model,
    cache: FeatureCache,
    config: TrainConfig,
    class_weight,
    callbacks,
    verbose: int | None = None,
) -> dict:
    """Train the head (compiled already) on the cached features; returns Keras' history.
    `verbose`: Keras' (default `verbosity()`).

    One pass: Keras shuffles the arrays each epoch. Several: epoch e trains on pass e mod K
    (CycledPasses). Labels are one-hot when the loss smooths them.
    """
    classes = head.output_shape[-1]
    val = (cache.val_x, targets(cache.val_y, classes, config.label_smoothing))
    common = {"epochs": config.epochs, "validation_data": val, "class_weight": class_weight}
    common |= {"callbacks": callbacks, "verbose": verbosity()}
    if cache.passes == 1:
        y = targets(cache.train_y[0], classes, config.label_smoothing)
        return head.fit(cache.train_x[0], y, batch_size=config.batch_size, shuffle=True, **common).history
    train_y = [targets(y, classes, config.label_smoothing) for y in cache.train_y]
    passes = CycledPasses(cache.train_x, train_y, config.batch_size, config.seed)
    return head.fit(passes, **common).history


def targets(labels: np.ndarray, classes: int, label_smoothing: float) -> np.ndarray:
    """Integer labels as the compiled loss wants them: as they are, or one-hot when the
    loss smooths them (Keras' sparse cross-entropy has no label smoothing)."""
    if not label_smoothing:
        return labels
    return np.eye(classes, dtype="float32")[labels]


def verbosity() -> int:
    """Keras' live progress bar on a terminal, one line per epoch in logs."""
    import sys

    return 1 if sys.stdout.isatty() else 2


class CycledPasses(keras.utils.PyDataset):
    """Batches of cached training passes: epoch e reads pass e mod K in a fresh seeded order.

    Every batch is full: the last one is completed with the epoch's first rows (a
    tf.distribute strategy splits a short last batch unevenly across replicas, which its
    gradient sum rejects).
    """

    def __init__(self, xs: list[np.ndarray], ys: list[np.ndarray], batch_size: int, seed: int):
        super().__init__()
        self.xs, self.ys, self.batch_size, self.seed = xs, ys, batch_size, seed
        self.epoch = 0
        self._order = self._shuffled()

    def _shuffled(self) -> np.ndarray:
        n = len(self.xs[self.epoch % len(self.xs)])
        return np.random.default_rng([self.seed, self.epoch]).permutation(n)

    def __len__(self) -> int:
        return -(-min(len(x) for x in self.xs) // self.batch_size)

    def __getitem__(self, index: int):
        k = self.epoch % len(self.xs)
        rows = np.resize(np.roll(self._order, -index * self.batch_size), self.batch_size)
        return self.xs[k][rows], self.ys[k][rows]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._order = self._shuffled()
