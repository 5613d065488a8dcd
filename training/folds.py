"""Cross-fitted heads (`ensemble_fit: folds`): an ensemble's K heads trained on train +
validation in K folds, as k-fold bagging does (AutoGluon's `num_bag_folds`).

With an ensemble trained on the training split alone, the validation images (300 of the
CIFAR-10 row's 1,000) only steer early stopping and the search. Cross-fitting puts them
to work: train + validation are split into K folds, stratified by class, and head i
trains on the other K - 1 folds and stops early (and halves its learning rate) on fold i.
Each head sees (K - 1) / K of the labelled images, every image is seen by K - 1 heads,
and every head is still stopped on images it never trained on.

What the run then reports as validation is out-of-fold: each validation image predicted
by the one head that held it out (`ensemble_out_of_fold_val_accuracy`). A single head's
answer is a conservative figure for the average of K; temperature scaling fits on those
same out-of-fold logits (training/calibrate.py), which lands T within a few hundredths of
the test split's own best T on the CIFAR-10 row (docs/benchmarks.md).

Held-out training images are scored on their first cached pass (augmented when the run
augments; the cache has no clean pass of train), validation images on their clean
features. The test split is never touched. What it gains, and what it costs:
docs/benchmarks.md, "Cross-fitted heads".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.config import DISTRIBUTED_FOLDS, TrainConfig
from training.features import FEATURE_CACHE_BUDGET_BYTES, FeatureCache

# A head trains on its fold's own copy of the cached features (Folds.cache), made beside
# the cache while it trains: at most this much, the cache's own budget (features.py).
FOLD_COPY_BUDGET_BYTES = FEATURE_CACHE_BUDGET_BYTES


def cache_bytes(cache: FeatureCache) -> int:
    """The bytes of the cached features: every training pass and validation."""
    return sum(x.nbytes for x in cache.train_x) + cache.val_x.nbytes


@dataclass(frozen=True)
class FitChoice:
    """How an ensemble's heads train ("folds" or "train") and why, in words (tag `ensemble.fit`)."""

    mode: str
    reason: str


def choose(config: TrainConfig, heads: int, cache: FeatureCache) -> FitChoice:
    """The `ensemble_fit` rule for `heads` heads on `cache` (written in docs/training.md)."""
    train, val = len(cache.train_y[0]), len(cache.val_y)
    seen = (train + val) * (heads - 1) // max(heads, 1)
    if heads < 2:
        return FitChoice("train", "one head: trained on the training split, stopped on validation")
    if config.ensemble_fit == "train":
        return FitChoice(
            "train", "ensemble_fit: train (each head on the training split, stopped on validation)"
        )
    folds = (
        f"{heads} folds of train + validation: each head trains on {seen} images "
        f"and stops early on the other {train + val - seen}"
    )
    # What stands in the way of folds; an explicit `folds` is refused on it, auto trains on train.
    obstacle = None
    if train + val < 2 * heads:
        obstacle = f"{train + val} labelled images are too few for {heads} folds (2 a fold at least)"
    elif config.distribute != "none":
        obstacle = DISTRIBUTED_FOLDS
    elif not cache.aligned:
        obstacle = "the cached training passes are not in one order, so a fold could not hold its images out"
    elif (copy := cache_bytes(cache)) > FOLD_COPY_BUDGET_BYTES:
        obstacle = (
            f"each fold's copy of the cached features would take {copy / 1024**3:.1f} GiB beside them "
            f"(at most {FOLD_COPY_BUDGET_BYTES / 1024**3:.0f} GiB)"
        )
    if config.ensemble_fit == "folds":
        if obstacle:
            raise ValueError(f"ensemble_fit: folds: {obstacle}; use --ensemble-fit train")
        return FitChoice("folds", f"ensemble_fit: folds ({folds})")
    if obstacle:
        return FitChoice("train", f"auto: {obstacle}")
    if config.fine_tune.unfreeze_layers:
        return FitChoice(
            "train", "auto: fine-tuning stops on the validation split, so the heads must not train on it"
        )
    if seen <= train:
        return FitChoice(
            "train",
            f"auto: {heads} folds would leave each head {seen} images, "
            f"no more than the training split's {train}",
        )
    return FitChoice("folds", f"auto: {folds} (the training split alone holds {train})")


@dataclass(frozen=True)
class Folds:
    """The fold of every labelled image: the training rows (in the cache's one order), then
    the validation rows."""

    of_train: np.ndarray
    of_val: np.ndarray
    count: int

    @classmethod
    def stratified(cls, cache: FeatureCache, count: int, seed: int) -> Folds:
        """`count` folds of train + validation, each class dealt round-robin over the folds
        in a seeded random order (so every fold holds each class within one image)."""
        labels = np.concatenate([cache.train_y[0], cache.val_y])
        rng = np.random.default_rng([seed, count])
        fold = np.zeros(len(labels), dtype=int)
        start = 0
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            fold[rows] = (start + np.arange(len(rows))) % count
            start = (start + len(rows)) % count  # the next class starts where this one ended
        n = len(cache.train_y[0])
        return cls(fold[:n], fold[n:], count)

    def cache(self, cache: FeatureCache, i: int) -> FeatureCache:
        """Head i's view of `cache`: training passes of every row outside fold i (validation
        rows join each pass with their clean features), validation = fold i."""
        keep_t, keep_v = self.of_train != i, self.of_val != i
        train_x = [np.concatenate([x[keep_t], cache.val_x[keep_v]]) for x in cache.train_x]
        train_y = [np.concatenate([y[keep_t], cache.val_y[keep_v]]) for y in cache.train_y]
        val_x = np.concatenate([cache.train_x[0][~keep_t], cache.val_x[~keep_v]])
        val_y = np.concatenate([cache.train_y[0][~keep_t], cache.val_y[~keep_v]])
        return FeatureCache(train_x, train_y, val_x, val_y, 0.0, aligned=True)


def balanced_weights(labels: np.ndarray, classes: int) -> dict[int, float]:
    """scikit-learn's "balanced" class weights, n / (classes present * count), of `labels`."""
    counts = np.bincount(labels, minlength=classes)
    present = np.flatnonzero(counts)
    return {int(c): float(len(labels) / (len(present) * counts[c])) for c in present}


class OutOfFold:
    """Each labelled image's logits from the head that held it out."""

    def __init__(self, folds: Folds, cache: FeatureCache, classes: int):
        self.folds = folds
        self.train = np.full((len(folds.of_train), classes), np.nan)
        self.val = np.full((len(folds.of_val), classes), np.nan)
        self.train_y, self.val_y = cache.train_y[0], cache.val_y

    def add(self, i: int, held_out_logits: np.ndarray) -> None:
        """Head i's logits on its fold, in `Folds.cache(..., i).val_x`'s order."""
        in_train = int((self.folds.of_train == i).sum())
        self.train[self.folds.of_train == i] = held_out_logits[:in_train]
        self.val[self.folds.of_val == i] = held_out_logits[in_train:]

    def fold_accuracy(self, i: int) -> float:
        """Head i's accuracy on its own held-out fold."""
        logits = np.concatenate([self.train[self.folds.of_train == i], self.val[self.folds.of_val == i]])
        labels = np.concatenate([self.train_y[self.folds.of_train == i], self.val_y[self.folds.of_val == i]])
        return float((logits.argmax(axis=1) == labels).mean())

    def complete(self) -> bool:
        return not (np.isnan(self.train).any() or np.isnan(self.val).any())

    def validation(self) -> tuple[np.ndarray, np.ndarray]:
        """(logits, labels) of the validation images, each from the head that held it out."""
        return self.val, self.val_y

    def labelled(self) -> tuple[np.ndarray, np.ndarray]:
        """(logits, labels) of train + validation, each from the head that held it out."""
        return np.concatenate([self.train, self.val]), np.concatenate([self.train_y, self.val_y])
