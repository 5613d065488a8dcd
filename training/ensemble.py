"""The search's best heads, averaged (`search_ensemble: K`, `--ensemble K`, default 5).

On a few hundred validation images the search's best trials cannot be told apart (its
spread says so: training/search.py), so picking the single best one picks among equals
by chance. With K > 1 the run keeps the K best trials instead, ranked on validation only
as the search ranks them. The best trial's head is trained by Keras as a single head
would be; the others keep the weights their trials ended with (the same head, optimiser
and early stopping in training/fast_head.py), so they cost no further training. The saved
model runs the backbone once and averages the heads' logits in front of the one
temperature and softmax (`training.model.build_ensemble_head`: stock layers). The
fine-tuning phase and temperature scaling then work on the averaged output. What it gains
on the CIFAR-10 row, and what it costs: docs/benchmarks.md."""

from __future__ import annotations

import logging
from collections.abc import Callable

import keras
import mlflow
import numpy as np

from training import features
from training.calibrate import negative_log_likelihood, softmax
from training.config import HeadConfig, TrainConfig
from training.features import FeatureCache
from training.model import ensemble_members
from training.search import SearchOutcome, Trial

log = logging.getLogger(__name__)


def members(outcome: SearchOutcome, config: TrainConfig) -> list[tuple[Trial, TrainConfig]]:
    """The K best trials (best first) and the run config each one's head trains with."""
    k = min(config.search_ensemble, len(outcome.ranked))
    return [(trial, outcome.apply(config, trial)) for trial in outcome.ranked[:k]]


def heads(chosen: list[tuple[Trial, TrainConfig]]) -> list[HeadConfig]:
    """The head configurations of `members(...)`, for `build_model(..., heads=...)`."""
    return [config.head for _, config in chosen]


def fit_members(
    model: keras.Model,
    cache: FeatureCache,
    chosen: list[tuple[Trial, TrainConfig]],
    class_weight,
    compile_model: Callable,
    callbacks: list,
) -> dict:
    """The member heads of `model`: the first (the best trial's) trained by Keras on the
    cached features with `callbacks` (its history is the run's); the others take the
    weights their trials ended the search with (training/fast_head.py trains the same
    head with the same optimiser, at its restored best epoch), so they cost nothing more.
    Returns the first member's history.
    """
    heads_of_model = ensemble_members(model)
    first, config = heads_of_model[0], chosen[0][1]
    classifier = keras.Sequential(
        [keras.Input(shape=cache.feature_shape), first, keras.layers.Activation("softmax", dtype="float32")],
        name=f"train_{first.name}",
    )
    compile_model(classifier, config.learning_rate, config.weight_decay, config.label_smoothing)
    history = features.fit_head(classifier, cache, config, class_weight, callbacks)
    for member, (trial, _) in zip(heads_of_model[1:], chosen[1:], strict=True):
        member.set_weights(trial.fit.weights)
    return history


def log_ensemble(model: keras.Model, cache: FeatureCache, chosen: list[tuple[Trial, TrainConfig]]) -> None:
    """The ensemble's and each member's validation figures (metrics, a table, one line)."""
    head = model.get_layer("head")
    probs = np.asarray(head(cache.val_x, training=False), dtype=np.float64)
    alone = [softmax(np.asarray(member(cache.val_x, training=False))) for member in ensemble_members(model)]
    metrics = {
        "ensemble_members": len(chosen),
        "ensemble_val_accuracy": _accuracy(probs, cache.val_y),
        "ensemble_val_loss": negative_log_likelihood(probs, cache.val_y),
    }
    for i, member_probs in enumerate(alone):
        metrics[f"ensemble_member_{i}_val_accuracy"] = _accuracy(member_probs, cache.val_y)
    mlflow.log_metrics(metrics)
    rows = [
        "| member | trial | pooling | units | dropout | learning rate | weight decay | label smoothing | val accuracy |"
    ]
    rows.append("|---|---|---|---|---|---|---|---|---|")
    for i, (trial, _) in enumerate(chosen):
        p, accuracy = trial.params, metrics[f"ensemble_member_{i}_val_accuracy"]
        rows.append(
            f"| {i} | {trial.number} | {p.pooling} | {p.units} | {p.dropout:.3f} | {p.learning_rate:.3g} | "
            f"{p.weight_decay:.3g} | {p.label_smoothing:.3f} | {accuracy:.4f} |"
        )
    mlflow.log_text("\n".join(rows) + "\n", "search/ensemble.md")
    log.info(
        "ensemble: the %d best trials (%s) averaged, val accuracy %.4f (the best trial's head alone %.4f)",
        len(chosen),
        ", ".join(str(trial.number) for trial, _ in chosen),
        metrics["ensemble_val_accuracy"],
        metrics["ensemble_member_0_val_accuracy"],
    )


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels).mean())
