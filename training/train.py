"""`train(config) -> TrainResult`: a folder of images becomes a tracked MLflow run.

Steps: scan the folder -> load the splits -> build the model -> fit the head (on cached
backbone features when nothing is random) -> optional fine-tuning -> temperature scaling
on the validation split (training/calibrate.py) -> evaluate on the held-out split -> log
pictures and the model with its card.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import keras
import mlflow
import numpy as np

from imgcls import parity
from imgcls.images import PREPROCESSING_VERSION
from imgcls.modelcard import ModelCard
from imgcls.settings import TrackingSettings
from training import augment, calibrate, ensemble, features, folds, search, tracking
from training import evaluate as ev
from training.config import TrainConfig
from training.data import DatasetScan, load_split, scan_dataset, split_view
from training.model import (
    ParamCounts,
    build_model,
    choose_blocks,
    count_params,
    feature_extractor,
    head_summary,
    model_summary,
    unfreeze_top,
)

log = logging.getLogger(__name__)

# Decoded training images are kept in memory between epochs below this size.
IMAGE_CACHE_BUDGET_BYTES = 2 * 1024**3


@dataclass
class TrainResult:
    """What a finished run produced; the model is the one logged to MLflow."""

    run_id: str
    model_uri: str
    card: ModelCard
    metrics: dict[str, float]
    evaluation: ev.Evaluation
    history: dict[str, list[float]]
    scan: DatasetScan
    model: keras.Model
    params: ParamCounts
    epoch_seconds: list[float] = field(default_factory=list)


@dataclass
class Splits:
    """Batched tf.data datasets of raw pixels and int labels. `train_in_order`: the training
    images in one fixed order every time (the cached backbone passes read it, so row r of
    every pass is the same image); None = `train`'s own order. `images`: how many images
    each split holds (what progress counts to)."""

    train: object
    val: object
    test: object
    train_in_order: object = None
    images: dict[str, int] = field(default_factory=dict)


def train(config: TrainConfig, settings: TrackingSettings | None = None) -> TrainResult:
    """Train, evaluate and log one model; the MLflow run is FAILED/KILLED if this raises."""
    settings = settings or TrackingSettings()
    scan = scan_dataset(
        config.data,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
        imbalance_ratio_warning=config.imbalance_ratio_warning,
        val_min_per_class=config.val_min_per_class,
    )
    for warning in scan.warnings:
        log.warning("%s", warning)
    choice = augment.choose_preset(config, scan.image_stats, scan.smallest_class("train"))
    sizes = {split: len(files) for split, files in scan.files.items()}
    config = features.resolve_passes(augment.resolve(config, choice), sizes)
    blocks = choose_blocks(config)
    config = config.model_copy(update={"backbone_blocks": blocks.blocks})
    tags = {
        "backbone": config.backbone,
        "git.revision": tracking.git_revision() or "unknown",
        "augment.preset": choice.preset,
        "augment.reason": choice.reason,
        "validation.rule": validation_rule(config),
        "augment.passes": features.passes_reason(config),
        "backbone.blocks": f"{blocks.blocks}: {blocks.reason}",
    }
    with tracking.tracked_run(settings, tags=tags) as run, _training_context(config) as strategy:
        log.info("MLflow run %s (experiment %s)", run.info.run_id, settings.experiment_name)
        log.info("augmentation: %s (%s)", choice.preset, choice.reason)
        if config.backbone != "simple_cnn":
            log.info("backbone passes: %s", features.passes_reason(config))
            log.info("the head reads: the %s block%s (%s)", blocks.blocks.replace("_", " "),
                     "s" if blocks.blocks == "last_two" else "", blocks.reason)  # fmt: skip
        log.info("validation: %d images, %s", len(scan.files["val"]), validation_rule(config))
        params = config.flat_params()
        if config.search:  # logged once the search has chosen them
            params = {k: v for k, v in params.items() if k not in search.SEARCHED_FIELDS}
        mlflow.log_params(params)
        tracking.log_dataset(scan)
        with split_view(settings.home) as view:
            splits = load_splits(scan, config, view)
            return _run(config, scan, splits, strategy, run.info.run_id)


def validation_rule(config: TrainConfig) -> str:
    """How the validation split is sized and what steers on it, in words (logged)."""
    return (
        f"max({config.val_fraction:.0%}, {config.val_min_per_class} images) per class, at most "
        "30% of a class (data.MAX_VAL_SHARE); its val_loss drives early stopping and the learning-rate schedule"
    )


def _run(config: TrainConfig, scan: DatasetScan, splits: Splits, strategy, run_id: str) -> TrainResult:
    with strategy.scope():
        model = build_model(config, len(scan.class_names))
        cache = _cached_features(model, splits, config, scan)
        members = None
        if config.search:
            outcome = search.search_head(cache, config, len(scan.class_names), _class_weights(scan, config))
            config = outcome.apply(config)
            mlflow.log_params(search.searched_params(config))
            members = ensemble.members(outcome, config)
            members = members if len(members) > 1 else None  # one trial: the single head
        elif cache is not None:  # copies of the configured head, cross-fitted (or None)
            members = ensemble.copies(config, cache)
        if config.search or members:
            # The cached features came from the first backbone: the new model takes its weights
            # (not the weights file again, nor new random ones).
            unloaded = config.model_copy(update={"weights": "none"})
            rebuilt = build_model(
                unloaded, len(scan.class_names), ensemble.heads(members) if members else None
            )
            rebuilt.get_layer("backbone").set_weights(model.get_layer("backbone").get_weights())
            model = rebuilt
        compile_model(model, config.learning_rate, config.weight_decay, config.label_smoothing)
    params = _log_architecture(model)
    with strategy.scope():  # every compile and fit, phase 2 and the cached head included
        history, seconds, held_out = fit_model(model, splits, config, scan, cache, members)
    n = len(scan.class_names)
    member_configs = [c for _, c in members] if members else None
    out_of_fold = functools.partial(calibrate.out_of_fold_logits, model, splits, config, n, member_configs)
    val_logits, images = None, "validation images"
    if held_out is not None:  # cross-fitted heads trained on validation: their held-out logits
        val_logits, images = held_out.validation(), "validation images (each from the head that held it out)"
        out_of_fold = functools.partial(_cross_fitted, held_out)
    elif cache is not None and not config.fine_tune.unfreeze_layers:  # the cached features still hold
        val_logits = calibrate.head_logits(model, cache.val_x), cache.val_y
    calibrated = calibrate.calibrate(
        model, splits.val, splits.test, scan.class_names, out_of_fold, val_logits, images,
        test_images=splits.images.get("test"),
    )  # fmt: skip
    model, evaluation = calibrated.model, calibrated.test
    metrics = evaluation.metrics()
    mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()})
    calibrate.log_calibration(calibrated)
    first_test_image = np.asarray(next(iter(splits.test))[0][:1])
    _log_pictures(model, config, splits, evaluation, history, first_test_image[0])
    card = ModelCard(
        class_names=scan.class_names,
        image_size=config.input_size,
        backbone=config.backbone,
        metrics={k: metrics[k] for k in ("accuracy", "macro_f1")},
        dataset_fingerprint=scan.fingerprint,
        preprocessing=PREPROCESSING_VERSION,  # the resize its training images went through
        temperature=calibrated.report.temperature,
        head=head_summary(model, config.backbone_blocks, cross_fitted=held_out is not None),
    )
    model_uri = tracking.log_keras_model(model, card, first_test_image, _parity_images(splits))
    return TrainResult(run_id, model_uri, card, metrics, evaluation, history, scan, model, params, seconds)


def _parity_images(splits: Splits) -> np.ndarray:
    """Up to 200 model inputs for the version's parity set: its test images first, then
    validation, then training ones (a compiled build is checked on them, service/compiled.py)."""
    sources = [
        splits.test,
        splits.val,
        splits.train if splits.train_in_order is None else splits.train_in_order,
    ]
    return parity.gather(itertools.chain.from_iterable(iter(s) for s in sources))


def _cross_fitted(held_out: folds.OutOfFold):
    """Every labelled image's held-out logits, for calibration's out-of-fold fallback."""
    logits, labels = held_out.labelled()
    return logits, labels, f"the ensemble's {held_out.folds.count} cross-fitted heads, each on its own fold"


def load_splits(scan: DatasetScan, config: TrainConfig, view_dir: Path) -> Splits:
    """Train (reshuffled each epoch), validation and test datasets, prefetched.

    Decoded pixels stay in memory between epochs while the splits fit the cache budget.
    """
    import tensorflow as tf

    size, batch = config.input_size, config.batch_size
    budget = IMAGE_CACHE_BUDGET_BYTES
    train = load_split(scan, "train", view_dir, size, batch, shuffle=True, seed=config.seed)
    if _split_bytes(scan, "train", size) <= budget:
        # Cache unbatched, then reshuffle per epoch: decode once, not once per epoch.
        n = len(scan.files["train"])
        decoded = train.unbatch().cache()  # filled once, in one order: the in-order view reads it too
        # unbatch() forgets the length; Keras would find it by running out of data.
        length = tf.data.experimental.assert_cardinality(-(-n // batch))
        train = decoded.shuffle(n, seed=config.seed).batch(batch).apply(length)
        in_order = decoded.batch(batch).apply(length)
        budget -= _split_bytes(scan, "train", size)
    else:  # the same files, unshuffled (a second reader, not a second copy)
        in_order = load_split(scan, "train", view_dir, size, batch, written=True)
    splits = [train]
    for split in ("val", "test"):
        dataset = load_split(scan, split, view_dir, size, batch)
        if _split_bytes(scan, split, size) <= budget:
            dataset = dataset.cache()
            budget -= _split_bytes(scan, split, size)
        splits.append(dataset)
    splits.append(in_order)
    images = {split: len(files) for split, files in scan.files.items()}
    return Splits(*(d.prefetch(tf.data.AUTOTUNE) for d in splits), images=images)


def _split_bytes(scan: DatasetScan, split: str, size: tuple[int, int]) -> int:
    return len(scan.files[split]) * size[0] * size[1] * 3 * 4  # float32 pixels


def _cached_features(model, splits, config, scan) -> features.FeatureCache | None:
    """The frozen backbone's features of validation and the training pass(es), when the head
    phase trains on them (features.uses_cache); None on the live path."""
    extractor = feature_extractor(model)
    if not features.uses_cache(config, extractor is not None):
        return None
    return features.compute_cache(model, extractor, splits, config, len(scan.files["train"]))


def compile_model(
    model: keras.Model, learning_rate: float, weight_decay: float = 0.0, label_smoothing: float = 0.0
) -> None:
    """Adam (AdamW with a weight decay) + cross-entropy (sparse; on one-hot targets when it
    smooths labels, features.targets) + accuracy."""
    optimizer = (
        keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
        if weight_decay
        else keras.optimizers.Adam(learning_rate)
    )
    loss = (
        keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
        if label_smoothing
        else keras.losses.SparseCategoricalCrossentropy()
    )
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])


@contextlib.contextmanager
def _training_context(config: TrainConfig):
    """Seeds, determinism, mixed precision and the tf.distribute strategy for one run."""
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        tf.config.experimental.enable_op_determinism()  # repeatable runs on CPU
    previous_policy = keras.mixed_precision.dtype_policy().name
    use_mixed = config.mixed_precision == "on" or (config.mixed_precision == "auto" and gpus)
    if use_mixed:
        keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        yield _strategy(config.distribute)
    finally:
        keras.mixed_precision.set_dtype_policy(previous_policy)


@functools.cache
def _strategy(name: str):
    """One strategy object per kind and process: a second MirroredStrategy in the same
    process reuses collective-op keys and clashes with the first one's."""
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":  # reads the cluster from TF_CONFIG
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _log_architecture(model: keras.Model) -> ParamCounts:
    params = count_params(model)
    mlflow.log_params(
        {
            "params.total": params.total,
            "params.trainable": params.trainable,
            "params.frozen": params.frozen,
        }
    )
    tracking.log_text(model_summary(model), "model/summary.txt")
    log.info(
        "parameters: %s total, %s trainable, %s frozen",
        f"{params.total:,}",
        f"{params.trainable:,}",
        f"{params.frozen:,}",
    )
    return params


def fit_model(
    model: keras.Model, splits: Splits, config: TrainConfig, scan: DatasetScan, cache=None, members=None
):
    """Phase 1 (head; on the cached features when there are; each head of an ensemble's
    `members`, training/ensemble.py) then optional fine-tuning.

    Call it inside the tf.distribute strategy's scope. Returns the merged per-epoch
    history, the wall-clock seconds of each epoch (epoch 1 of a cached head includes the
    backbone passes that made the cache) and, for cross-fitted heads (training/folds.py),
    their held-out logits (else None).
    """
    timer, held_out = EpochTimer(), None
    extractor = feature_extractor(model)
    class_weight = _class_weights(scan, config)
    if extractor is None:
        validation, validate = _validation(model, splits, config)
        history = _fit_full(
            model, splits, config, class_weight, [*validation, timer], offset=0, validate=validate
        )
    elif cache is not None and members:
        fitted = _fit_ensemble_on_cached_features(model, cache, members, class_weight, timer)
        history, held_out = fitted.history, fitted.out_of_fold
    elif cache is not None:
        history = _fit_head_on_cached_features(model, cache, config, class_weight, timer)
    else:
        val_callback = CachedValidation(model.get_layer("head"), extractor, splits.val)
        history = _fit_full(
            model, splits, config, class_weight, [val_callback, timer], offset=0, validate=False
        )
    if config.fine_tune.unfreeze_layers and extractor is not None:
        tuned = _fine_tune(model, splits, config, class_weight, timer, len(history["loss"]))
        history = _merge(history, tuned)
    return history, timer.seconds, held_out


def _fit_full(model, splits, config, class_weight, callbacks, offset, validate=True, epochs=None):
    train, val = splits.train, splits.val
    if config.label_smoothing:  # the smoothing loss takes one-hot targets
        classes = model.output_shape[-1]
        train, val = (_one_hot(d, classes) for d in (train, val))
    result = model.fit(
        train,
        validation_data=val if validate else None,
        epochs=epochs or config.epochs,
        class_weight=class_weight,
        callbacks=[*callbacks, *_standard_callbacks(config, offset)],
        shuffle=False,  # the dataset reshuffles itself each epoch (load_splits)
        verbose=features.verbosity(),
    )
    return result.history


def _one_hot(dataset, classes: int):
    import tensorflow as tf

    return dataset.map(lambda images, labels: (images, tf.one_hot(labels, classes)))


def _fit_head_on_cached_features(model, cache, config, class_weight, timer):
    """Train only the head on the cached features; epoch 1's time includes the backbone
    passes that made them."""
    head = model.get_layer("head")
    compile_model(head, config.learning_rate, config.weight_decay, config.label_smoothing)
    history = features.fit_head(head, cache, config, class_weight, [timer, *_standard_callbacks(config, 0)])
    timer.seconds[0] += cache.seconds
    return history


def _fit_ensemble_on_cached_features(model, cache, members, class_weight, timer) -> ensemble.Fitted:
    """The best trial's head trained by Keras on the cached features (timed and logged per
    epoch: the run's curves), the other members in NumPy or from their trials, on the
    training split or cross-fitted on train + validation (training/ensemble.py, folds.py)."""
    choice = folds.choose(members[0][1], len(members), cache)
    callbacks = [timer, *_standard_callbacks(members[0][1], 0)]
    fitted = ensemble.fit_members(model, cache, members, class_weight, compile_model, callbacks, choice)
    ensemble.log_ensemble(model, cache, members, fitted, choice)
    timer.seconds[0] += cache.seconds
    return fitted


def _fine_tune(model, splits, config, class_weight, timer, offset):
    opened = unfreeze_top(model, config.fine_tune.unfreeze_layers)
    log.info("fine-tuning: %d backbone layers unfrozen at lr %g", opened, config.fine_tune.learning_rate)
    compile_model(model, config.fine_tune.learning_rate, label_smoothing=config.label_smoothing)
    mlflow.log_param("fine_tune.layers_unfrozen", opened)
    validation, validate = _validation(model, splits, config)
    callbacks = [*validation, timer]
    return _fit_full(
        model, splits, config, class_weight, callbacks, offset, validate, config.fine_tune.epochs
    )


def _validation(model, splits, config) -> tuple[list[keras.callbacks.Callback], bool]:
    """(callbacks, whether Keras validates): under a tf.distribute strategy the model is
    validated directly, outside the strategy (DirectValidation)."""
    if config.distribute == "none":
        return [], True
    return [DirectValidation(model, splits.val)], False


def _standard_callbacks(config: TrainConfig, offset: int) -> list[keras.callbacks.Callback]:
    return [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.early_stopping_patience, restore_best_weights=True
        ),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=config.reduce_lr_patience),
        tracking.EpochMetricsLogger(offset=offset),
    ]


def _class_weights(scan: DatasetScan, config: TrainConfig) -> dict[int, float] | None:
    if config.class_weight != "balanced":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([label for _, label in scan.files["train"]])
    classes = np.unique(labels)
    weights = compute_class_weight("balanced", classes=classes, y=labels)
    return {int(c): float(w) for c, w in zip(classes, weights, strict=True)}


def _merge(first: dict, second: dict) -> dict:
    return {k: list(first.get(k, [])) + list(second.get(k, [])) for k in first.keys() | second.keys()}


class CachedValidation(keras.callbacks.Callback):
    """Validation on backbone features computed once: the frozen backbone gives the same
    features every epoch, so only the head runs. Adds val_loss/val_accuracy to the logs."""

    def __init__(self, head: keras.Model, extractor: keras.Model, dataset):
        super().__init__()
        self.head = head
        self.features, self.labels = features.backbone_features(extractor, dataset)

    def on_epoch_end(self, epoch, logs=None):
        batches = np.array_split(self.features, max(1, len(self.features) // 256))
        probs = np.concatenate([np.asarray(self.head(b, training=False)) for b in batches])
        _validation_logs(probs, self.labels, logs)


class DirectValidation(keras.callbacks.Callback):
    """Validation by calling the model on each batch, outside any tf.distribute strategy:
    a strategy splits a last batch smaller than its replica count into an empty one,
    which TensorFlow's CPU convolution rejects ("input depth must be evenly divisible").
    Adds val_loss/val_accuracy to the logs."""

    def __init__(self, model: keras.Model, dataset):
        super().__init__()
        self.classifier, self.dataset = model, dataset

    def on_epoch_end(self, epoch, logs=None):
        probs, labels = [], []
        for images, batch_labels in self.dataset:
            probs.append(np.asarray(self.classifier(images, training=False)))
            labels.append(np.asarray(batch_labels))
        _validation_logs(np.concatenate(probs), np.concatenate(labels), logs)


def _validation_logs(probs: np.ndarray, labels: np.ndarray, logs: dict | None) -> None:
    """val_loss (cross-entropy) and val_accuracy of softmax outputs, into Keras' logs."""
    probs = probs.astype("float64")
    picked = probs[np.arange(len(labels)), labels]
    logs = logs if logs is not None else {}
    logs["val_loss"] = float(-np.log(np.clip(picked, 1e-7, 1.0)).mean())
    logs["val_accuracy"] = float((probs.argmax(axis=1) == labels).mean())


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock seconds per epoch; epoch 1 of a cached run includes feature extraction."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self._start: float | None = None

    def start_once(self) -> None:
        import time

        self._start = self._start or time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.start_once()

    def on_epoch_end(self, epoch, logs=None):
        import time

        self.seconds.append(time.perf_counter() - self._start)
        self._start = None


def _log_pictures(model, config, splits, evaluation, history, test_image) -> None:
    tracking.log_figure(ev.confusion_figure(evaluation), "confusion_matrix")
    tracking.log_figure(ev.curves_figure(history), "training_curves")
    tracking.log_figure(ev.misclassified_figure(evaluation), "misclassified")
    tracking.log_figure(ev.kernels_figure(model), "first_layer_kernels")
    tracking.log_figure(ev.activations_figure(model, test_image), "activation_maps")
    if config.augment.active:
        sample = next(iter(splits.train))[0]
        augmentation = model.get_layer("augmentation")
        tracking.log_figure(ev.augmentation_figure(augmentation, np.asarray(sample)), "augmentation_preview")
