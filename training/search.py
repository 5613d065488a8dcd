"""`--search N`: N head configurations tried on the cached backbone features (Optuna TPE).

Each trial trains a head on the run's cached training features (training/fast_head.py)
and is scored on the validation split: accuracy, then validation loss to break ties. Each
trial is a nested MLflow run with its params and metrics; the parent run gets the trial
table (`search/trials.csv`, `search/trials.md`), a plot (`plots/search.png`) and the
spread: the standard error of the best trial's validation accuracy and a paired bootstrap
95% interval of best minus second on the same validation images. The test split is never
seen. The caller then trains the best configuration as the run's model, with the next
best trials' heads beside it when it averages several (training/ensemble.py: the trials
keep the weights that needs).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace

import mlflow
import numpy as np
from threadpoolctl import threadpool_limits

from training import tracking
from training.config import HeadConfig, TrainConfig
from training.fast_head import HeadParams, Schedule, TrialFit, fit_trial, pool
from training.features import FeatureCache

log = logging.getLogger(__name__)

# The search space. Flatten is left out: on a 3x3 map or larger it multiplies the head's
# inputs by 9 or more and overfits the few hundred images a search sees.
POOLINGS = ("avg", "max")
UNITS = (0, 128, 256, 512)  # 0 = softmax on the pooled features (a linear probe)
LEARNING_RATE = (1e-4, 1e-2)
DROPOUT = (0.0, 0.6)
WEIGHT_DECAY = (1e-4, 0.3)  # AdamW's decoupled decay, log scale
LABEL_SMOOTHING = (0.0, 0.2)
# The config fields a search sets (their run params are logged after it).
SEARCHED_FIELDS = (
    "learning_rate",
    "weight_decay",
    "label_smoothing",
    "head.pooling",
    "head.dense_units",
    "head.dropout",
)
BOOTSTRAP_SAMPLES = 2000  # resamples for the 95% interval: its ends move by 1-2 images in 300 between seeds


@dataclass(frozen=True)
class Trial:
    """One finished trial: its configuration and validation outcome."""

    number: int
    params: HeadParams
    fit: TrialFit
    seconds: float

    def row(self) -> dict[str, object]:
        return {
            "trial": self.number,
            **asdict(self.params),
            "val_accuracy": round(self.fit.val_accuracy, 4),
            "val_loss": round(self.fit.val_loss, 4),
            "epochs": self.fit.epochs,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class Spread:
    """How far apart the best two trials are, on the same validation images."""

    best_se: float  # standard error of the best trial's validation accuracy
    gap: float  # best minus second validation accuracy
    gap_low: float  # paired bootstrap 95% interval of the gap
    gap_high: float


@dataclass(frozen=True)
class SearchOutcome:
    """All trials (in order), the ranked ones (best first), the spread and the time they took."""

    trials: list[Trial]
    ranked: list[Trial]
    spread: Spread | None
    seconds: float

    @property
    def best(self) -> Trial:
        """The trial ranked first on validation (accuracy, then loss)."""
        return self.ranked[0]

    def apply(self, config: TrainConfig, trial: Trial | None = None) -> TrainConfig:
        """`config` with the best trial's (or `trial`'s) head, learning rate, weight decay,
        label smoothing."""
        p = (trial or self.best).params
        head = HeadConfig(pooling=p.pooling, dense_units=[p.units] if p.units else [], dropout=p.dropout)
        update = {"head": head, "learning_rate": p.learning_rate, "weight_decay": p.weight_decay}
        return config.model_copy(update=update | {"label_smoothing": p.label_smoothing})


def searched_params(config: TrainConfig) -> dict[str, str]:
    """The run params the search decides, as logged once it has (flat keys)."""
    flat = config.flat_params()
    return {key: flat[key] for key in SEARCHED_FIELDS}


def schedule(config: TrainConfig) -> Schedule:
    """The head phase's epochs, batch, early stopping and plateau, for fast_head's fits."""
    return Schedule(
        config.epochs, config.batch_size, config.early_stopping_patience, config.reduce_lr_patience
    )


def search_head(cache: FeatureCache, config: TrainConfig, classes: int, class_weight) -> SearchOutcome:
    """Run config.search trials on `cache` inside the active MLflow run (nested runs)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per trial on the terminal
    start = time.perf_counter()
    objective = _Objective(cache, config, classes, class_weight)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=config.seed))
    default = _default_trial(config)
    if default is not None and not _spatial(cache):
        default.pop("pooling")  # a 1x1 map (backbone_blocks: last_two) pools to itself
    if default is not None:
        study.enqueue_trial(default)  # the configured head is trial 0: the search can only beat it
    # One BLAS thread: a trial's matrices are small, and more threads only contend with
    # each other and TensorFlow's (4x slower on 2 busy cores).
    with threadpool_limits(limits=1):
        study.optimize(objective, n_trials=config.search)
    trials = objective.trials
    kept = {t.number for t in sorted(trials, key=_rank)[: config.search_ensemble]}  # an ensemble's weights
    trials = [t if t.number in kept else replace(t, fit=replace(t.fit, weights=[])) for t in trials]
    ranked = sorted(trials, key=_rank)
    spread = _spread(ranked[0], ranked[1], cache.val_y, config.seed) if len(ranked) > 1 else None
    outcome = SearchOutcome(trials, ranked, spread, time.perf_counter() - start)
    _record(outcome, cache)
    return outcome


class _Objective:
    """Optuna's objective: suggest a head, train it on the cached features, log a nested run."""

    def __init__(self, cache: FeatureCache, config: TrainConfig, classes: int, class_weight):
        self.cache, self.config, self.classes, self.class_weight = cache, config, classes, class_weight
        self.schedule = schedule(config)
        self.pooled: dict[str, tuple[list, tuple]] = {}
        self.trials: list[Trial] = []

    def __call__(self, trial) -> float:
        params = HeadParams(
            pooling=trial.suggest_categorical("pooling", POOLINGS) if _spatial(self.cache) else "avg",
            units=trial.suggest_categorical("units", UNITS),
            dropout=trial.suggest_float("dropout", *DROPOUT),
            learning_rate=trial.suggest_float("learning_rate", *LEARNING_RATE, log=True),
            weight_decay=trial.suggest_float("weight_decay", *WEIGHT_DECAY, log=True),
            label_smoothing=trial.suggest_float("label_smoothing", *LABEL_SMOOTHING),
        )
        train, val = self._features(params.pooling)
        start = time.perf_counter()
        seed = self.config.seed + trial.number
        fit = fit_trial(train, val, self.classes, params, self.schedule, self.class_weight, seed)
        record = Trial(trial.number, params, fit, time.perf_counter() - start)
        self.trials.append(record)
        _log_trial(record)
        return fit.val_accuracy

    def _features(self, pooling: str):
        """Pooled training passes and validation features, computed once per pooling."""
        if pooling not in self.pooled:
            c = self.cache
            train = [(pool(x, pooling), y) for x, y in zip(c.train_x, c.train_y, strict=True)]
            self.pooled[pooling] = (train, (pool(c.val_x, pooling), c.val_y))
        return self.pooled[pooling]


def _rank(trial: Trial) -> tuple:
    """Best first: validation accuracy, then validation loss, then the earlier trial."""
    return (-trial.fit.val_accuracy, trial.fit.val_loss, trial.number)


def _spatial(cache: FeatureCache) -> bool:
    """Whether the cached maps have more than one cell, so that pooling them is a choice."""
    return cache.feature_shape[:2] != (1, 1)


def _default_trial(config: TrainConfig) -> dict | None:
    """The configured head as trial params, when the search space holds it."""
    head = config.head
    units = head.dense_units[0] if len(head.dense_units) == 1 else (0 if not head.dense_units else None)
    if head.pooling not in POOLINGS or units not in UNITS:
        return None
    clip = lambda value, bounds: min(max(value, bounds[0]), bounds[1])  # noqa: E731
    return {
        "pooling": head.pooling,
        "units": units,
        "dropout": clip(head.dropout, DROPOUT),
        "learning_rate": clip(config.learning_rate, LEARNING_RATE),
        "weight_decay": clip(config.weight_decay, WEIGHT_DECAY),  # 0 -> the smallest, ~no decay
        "label_smoothing": clip(config.label_smoothing, LABEL_SMOOTHING),
    }


def _spread(best: Trial, second: Trial, labels: np.ndarray, seed: int) -> Spread:
    """Standard error of the best accuracy; paired bootstrap interval of best - second.

    Resampling validation images with replacement only moves the counts of images where
    best alone is right, second alone is right, or they agree: the bootstrap draws those
    three counts (multinomially), which is the same distribution at any validation size.
    """
    right_best = best.fit.val_probs.argmax(axis=1) == labels
    right_second = second.fit.val_probs.argmax(axis=1) == labels
    n = len(labels)
    only_best, only_second = int((right_best & ~right_second).sum()), int((right_second & ~right_best).sum())
    shares = np.array([only_best, only_second, n - only_best - only_second]) / n
    counts = np.random.default_rng(seed).multinomial(n, shares, size=BOOTSTRAP_SAMPLES)
    gaps = (counts[:, 0] - counts[:, 1]) / n
    low, high = np.percentile(gaps, [2.5, 97.5])
    p = right_best.mean()
    return Spread(float(np.sqrt(p * (1 - p) / n)), (only_best - only_second) / n, float(low), float(high))


def _log_trial(trial: Trial) -> None:
    with mlflow.start_run(run_name=f"trial {trial.number}", nested=True):
        mlflow.log_params({**asdict(trial.params), "trial": trial.number})
        mlflow.log_metrics(
            {
                "val_accuracy": trial.fit.val_accuracy,
                "val_loss": trial.fit.val_loss,
                "epochs": trial.fit.epochs,
                "best_epoch": trial.fit.best_epoch,
                "seconds": trial.seconds,
            }
        )


def _record(outcome: SearchOutcome, cache: FeatureCache) -> None:
    """The parent run's table, plot, spread and timings; one summary line on the terminal."""
    rows = [t.row() for t in outcome.trials]
    mlflow.log_text(_csv(rows), "search/trials.csv")
    mlflow.log_text(_markdown(rows), "search/trials.md")
    tracking.log_figure(search_figure(outcome), "search")
    trial_seconds = sum(t.seconds for t in outcome.trials)
    metrics = {
        "search_trials": len(outcome.trials),
        "search_best_trial": outcome.best.number,
        "search_best_val_accuracy": outcome.best.fit.val_accuracy,
        "search_best_val_loss": outcome.best.fit.val_loss,
        "search_seconds": outcome.seconds,
        "search_trial_seconds": trial_seconds,
        "search_backbone_seconds": cache.seconds,
    }
    if outcome.spread is not None:
        s = outcome.spread
        metrics |= {
            "search_best_val_accuracy_se": s.best_se,
            "search_best_minus_second": s.gap,
            "search_best_minus_second_ci_low": s.gap_low,
            "search_best_minus_second_ci_high": s.gap_high,
        }
    mlflow.log_metrics(metrics)
    log.info("%s", summary(outcome, cache.seconds, len(cache.val_y)))


def summary(outcome: SearchOutcome, backbone_seconds: float, val_images: int) -> str:
    """The search in one line: cost against the backbone pass, the winner and the spread."""
    best = outcome.best
    line = (
        f"search: {len(outcome.trials)} trials in {outcome.seconds:.1f} s (the cached backbone "
        f"passes took {backbone_seconds:.1f} s); best trial {best.number}: {_describe(best.params)}, "
        f"val accuracy {best.fit.val_accuracy:.4f} on {val_images} images"
    )
    if outcome.spread is None:
        return line
    s = outcome.spread
    verdict = "clear" if s.gap_low > 0 else "within noise"
    return (
        f"{line} (SE {s.best_se:.4f}); best - second {s.gap:+.4f}, "
        f"95% bootstrap interval [{s.gap_low:+.4f}, {s.gap_high:+.4f}]: {verdict}"
    )


def _describe(p: HeadParams) -> str:
    units = f"dense {p.units}" if p.units else "no hidden layer"
    return (
        f"{p.pooling} pooling, {units}, dropout {p.dropout:.2f}, lr {p.learning_rate:.2g}, "
        f"weight decay {p.weight_decay:.2g}, label smoothing {p.label_smoothing:.2f}"
    )


def _csv(rows: list[dict]) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def search_figure(outcome: SearchOutcome):
    """Validation accuracy per trial (with +-1.96 SE) and against the learning rate."""
    from training.evaluate import _figure

    n = len(outcome.best.fit.val_probs)
    accuracy = np.array([t.fit.val_accuracy for t in outcome.trials])
    error = 1.96 * np.sqrt(accuracy * (1 - accuracy) / n)
    colours = ["tab:red" if t is outcome.best else "tab:blue" for t in outcome.trials]
    fig = _figure(10, 4)
    ax = fig.add_subplot(1, 2, 1)
    ax.errorbar(range(len(accuracy)), accuracy, yerr=error, fmt="none", ecolor="lightgray")
    ax.scatter(range(len(accuracy)), accuracy, c=colours)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation accuracy ({n} images)")
    ax.set_title("trials (red: best; bars: 95% binomial)")
    ax = fig.add_subplot(1, 2, 2)
    for pooling, marker in zip(POOLINGS, "os", strict=True):
        picked = [t for t in outcome.trials if t.params.pooling == pooling]
        ax.scatter(
            [t.params.learning_rate for t in picked],
            [t.fit.val_accuracy for t in picked],
            marker=marker,
            label=pooling,
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.legend(title="pooling")
    fig.tight_layout()
    return fig
