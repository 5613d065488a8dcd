"""The search's best heads, averaged (`search_ensemble: K`, `--ensemble K`, default 5).

On a few hundred validation images the search's best trials cannot be told apart (its
spread says so: training/search.py), so picking the single best one picks among equals
by chance. With K > 1 the run keeps the K best trials instead, ranked on validation only
as the search ranks them. How their heads train (`ensemble_fit`, training/folds.py):
- "train": the best trial's head is trained by Keras as a single head would be; the
  others keep the weights their trials ended with (the same head, optimiser and early
  stopping in training/fast_head.py), so they cost no further training;
- "folds" (cross-fitted): head i trains on train + validation less fold i and stops on
  fold i, the first by Keras, the others in NumPy; K - 1 more head fits.
Without a search, `copies` makes K copies of the configured head to cross-fit (each on its
own folds, so they differ), wherever the folds rule applies; elsewhere one head.
The saved model runs the backbone once and averages the heads' logits in front of the one
temperature and softmax (`training.model.build_ensemble_head`: stock layers). The
fine-tuning phase and temperature scaling then work on the averaged output. What it gains
on the CIFAR-10 row, and what it costs: docs/benchmarks.md."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import keras
import mlflow
import numpy as np
from threadpoolctl import threadpool_limits

from training import features, search
from training.calibrate import softmax
from training.config import HeadConfig, TrainConfig
from training.evaluate import negative_log_likelihood
from training.fast_head import HeadParams, fit_trial, pool
from training.features import FeatureCache
from training.folds import FitChoice, Folds, OutOfFold, balanced_weights, choose
from training.model import ensemble_members
from training.search import SearchOutcome, Trial

log = logging.getLogger(__name__)


def members(outcome: SearchOutcome, config: TrainConfig) -> list[tuple[Trial, TrainConfig]]:
    """The K best trials (best first) and the run config each one's head trains with."""
    k = min(config.search_ensemble, len(outcome.ranked))
    return [(trial, outcome.apply(config, trial)) for trial in outcome.ranked[:k]]


def copies(config: TrainConfig, cache: FeatureCache) -> list[tuple[Trial, TrainConfig]] | None:
    """Without a search: `search_ensemble` copies of the configured head, to cross-fit
    (each on its own folds, so they differ), or None for the single head: one asked for,
    a head of more than one dense layer (fast_head trains one at most), or the folds rule
    saying train (training/folds.py: copies on the same training split would be alike)."""
    head, k = config.head, config.search_ensemble
    if k < 2 or len(head.dense_units) > 1 or choose(config, k, cache).mode != "folds":
        return None
    params = HeadParams(
        pooling=head.pooling,
        units=head.dense_units[0] if head.dense_units else 0,
        dropout=head.dropout,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
    )
    return [(Trial(i, params, fit=None, seconds=0.0), config) for i in range(k)]


def heads(chosen: list[tuple[Trial, TrainConfig]]) -> list[HeadConfig]:
    """The head configurations of `members(...)`, for `build_model(..., heads=...)`."""
    return [config.head for _, config in chosen]


@dataclass
class Fitted:
    """The first head's Keras history (the run's curves) and, when the heads were
    cross-fitted (training/folds.py), every labelled image's held-out logits."""

    history: dict
    out_of_fold: OutOfFold | None = None


def fit_members(
    model: keras.Model,
    cache: FeatureCache,
    chosen: list[tuple[Trial, TrainConfig]],
    class_weight,
    compile_model: Callable,
    callbacks: list,
    choice: FitChoice,
) -> Fitted:
    """The member heads of `model`, best trial first.

    `choice.mode == "train"`: the first head is trained by Keras on the cached features
    with `callbacks` (its history is the run's); the others take the weights their trials
    ended the search with (training/fast_head.py trains the same head with the same
    optimiser, at its restored best epoch), so they cost nothing more.
    `"folds"`: head i trains on the folds other than i of train + validation and stops on
    fold i; the first by Keras with `callbacks`, the others in NumPy (fast_head), each
    with its trial's configuration.
    """
    heads_of_model = ensemble_members(model)
    folds = Folds.stratified(cache, len(chosen), chosen[0][1].seed) if choice.mode == "folds" else None
    classes, config = model.output_shape[-1], chosen[0][1]
    out_of_fold = OutOfFold(folds, cache, classes) if folds else None
    history: dict = {}
    for i, (member, (trial, _)) in enumerate(zip(heads_of_model, chosen, strict=True)):
        if folds is None and i:  # on the training split: the trial's own weights
            member.set_weights(trial.fit.weights)
            continue
        view = folds.cache(cache, i) if folds else cache  # one fold's copy at a time
        # Balanced class weights follow the images a head trains on (train + validation).
        weights = balanced_weights(view.train_y[0], classes) if folds and class_weight else class_weight
        if i == 0:
            history = _fit_by_keras(member, view, config, weights, compile_model, callbacks)
        else:
            _fit_in_numpy(member, view, trial, config, classes, weights)
        if out_of_fold is not None:
            out_of_fold.add(i, _logits(member, view.val_x))
        del view  # before the next fold's copy is made: the cache and one copy at a time
    return Fitted(history, out_of_fold)


def _fit_by_keras(
    member, view: FeatureCache, config: TrainConfig, class_weight, compile_model, callbacks
) -> dict:
    """The head trained by Keras on `view` with the run's callbacks: its history is the run's."""
    classifier = keras.Sequential(
        [keras.Input(shape=view.feature_shape), member, keras.layers.Activation("softmax", dtype="float32")],
        name=f"train_{member.name}",
    )
    compile_model(classifier, config.learning_rate, config.weight_decay, config.label_smoothing)
    return features.fit_head(classifier, view, config, class_weight, callbacks)


def _fit_in_numpy(member, view: FeatureCache, trial: Trial, config: TrainConfig, classes: int, class_weight):
    """The head trained in NumPy with its trial's configuration on `view` (training/fast_head.py)."""
    p = trial.params
    passes = [(pool(x, p.pooling), y) for x, y in zip(view.train_x, view.train_y, strict=True)]
    held_out = (pool(view.val_x, p.pooling), view.val_y)
    with threadpool_limits(limits=1):  # small matrices: one BLAS thread, as in the search
        fit = fit_trial(
            passes, held_out, classes, p, search.schedule(config), class_weight, config.seed + trial.number
        )
    member.set_weights(fit.weights)


def _logits(member: keras.Model, x: np.ndarray, batch: int = 256) -> np.ndarray:
    chunks = np.array_split(x, max(1, -(-len(x) // batch)))
    return np.concatenate([np.asarray(member(chunk, training=False), dtype=np.float64) for chunk in chunks])


def log_ensemble(
    model: keras.Model,
    cache: FeatureCache,
    chosen: list[tuple[Trial, TrainConfig]],
    fitted: Fitted,
    choice: FitChoice,
) -> None:
    """The ensemble's and each member's validation figures (metrics, a table, one line).

    Heads trained on the training split are scored on validation, alone and averaged.
    Cross-fitted heads trained on most of it: each is scored on its own held-out fold, and
    the ensemble's figure is out-of-fold (each validation image from the head that held it out).
    """
    mlflow.set_tag("ensemble.fit", f"{choice.mode}: {choice.reason}")
    metrics: dict[str, float] = {"ensemble_members": len(chosen)}
    if fitted.out_of_fold is None:
        probs = np.asarray(model.get_layer("head")(cache.val_x, training=False), dtype=np.float64)
        metrics["ensemble_val_accuracy"] = _accuracy(probs, cache.val_y)
        metrics["ensemble_val_loss"] = negative_log_likelihood(probs, cache.val_y)
        for i, member in enumerate(ensemble_members(model)):
            member_probs = softmax(np.asarray(member(cache.val_x, training=False)))
            metrics[f"ensemble_member_{i}_val_accuracy"] = _accuracy(member_probs, cache.val_y)
        column, key = "val accuracy", "ensemble_member_{}_val_accuracy"
    else:
        oof = fitted.out_of_fold
        logits, labels = oof.validation()
        metrics["ensemble_out_of_fold_val_accuracy"] = _accuracy(logits, labels)
        metrics["ensemble_out_of_fold_val_loss"] = negative_log_likelihood(softmax(logits), labels)
        for i in range(len(chosen)):
            metrics[f"ensemble_member_{i}_held_out_accuracy"] = oof.fold_accuracy(i)
        column, key = "held-out fold accuracy", "ensemble_member_{}_held_out_accuracy"
    mlflow.log_metrics(metrics)
    columns = ["member", "trial", "pooling", "units", "dropout", "learning rate", "weight decay"]
    rows = ["| " + " | ".join([*columns, "label smoothing", column]) + " |"]
    rows.append("|---|---|---|---|---|---|---|---|---|")
    for i, (trial, _) in enumerate(chosen):
        p, accuracy = trial.params, metrics[key.format(i)]
        rows.append(
            f"| {i} | {trial.number} | {p.pooling} | {p.units} | {p.dropout:.3f} | {p.learning_rate:.3g} | "
            f"{p.weight_decay:.3g} | {p.label_smoothing:.3f} | {accuracy:.4f} |"
        )
    table = "\n".join(rows) + f"\n\nHow the heads trained: {choice.mode}: {choice.reason}\n"
    searched = chosen[0][0].fit is not None  # trials of a search, or copies of the configured head
    mlflow.log_text(table, "search/ensemble.md" if searched else "ensemble.md")
    trials = ", ".join(str(trial.number) for trial, _ in chosen)
    if not searched:
        log.info(
            "ensemble: %d copies of the configured head averaged, cross-fitted on %s; out-of-fold val "
            "accuracy %.4f (each validation image from the head that held it out)",
            len(chosen), choice.reason.split(": ", 1)[-1], metrics["ensemble_out_of_fold_val_accuracy"],
        )  # fmt: skip
    elif fitted.out_of_fold is None:
        log.info(
            "ensemble: the %d best trials (%s) averaged, val accuracy %.4f (the best trial's head alone %.4f)",
            len(chosen), trials, metrics["ensemble_val_accuracy"], metrics["ensemble_member_0_val_accuracy"],
        )  # fmt: skip
    else:
        log.info(
            "ensemble: the %d best trials (%s) averaged, cross-fitted on %s; out-of-fold val accuracy %.4f "
            "(each validation image from the head that held it out)",
            len(chosen), trials, choice.reason.split(": ", 1)[-1],
            metrics["ensemble_out_of_fold_val_accuracy"],
        )  # fmt: skip


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels).mean())
