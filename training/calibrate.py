"""Temperature scaling: probabilities that mean what they say (Guo et al., 2017).

A classifier's softmax is often overconfident: a misclassified photo at probability 1.00.
Dividing the logits by one temperature T > 1 softens every answer alike (T < 1 sharpens
them); the ranking, hence accuracy and macro-F1, does not move. T is fitted after
training by minimising the negative log-likelihood (NLL) of held-out predictions that
contain errors: the validation split. On a split without a single error the NLL keeps
falling as T goes to 0: then T is fitted on out-of-fold predictions of train + validation
(heads trained on the other folds of the cached backbone features), and where those hold
no error either, or the model has no frozen backbone (simple_cnn), T stays 1. The run
says which (tag `calibration.reason`).

The saved model emits the calibrated probabilities itself: its head ends in stock layers,
Dense `logits` -> Rescaling `temperature` (scale 1/T) -> Activation `probs` (softmax)
(training/model.py), so `safe_mode=True` loading and the JAX path hold. Calibrating
rebuilds the model from its own config with the new scale and copies the weights.

Figures, before and after, on validation and on the test split: ECE (15 equal-width bins
of top-1 confidence) and NLL, as MLflow metrics `calibration.*`, a tag
`calibration.reason` and `plots/reliability_diagram.png`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np

from training.evaluate import ECE_BINS, evaluate_model, expected_calibration_error, negative_log_likelihood

log = logging.getLogger(__name__)

# T is searched on log T within these bounds: beyond them a model is broken, not miscalibrated.
T_BOUNDS = (0.05, 20.0)
TEMPERATURE_LAYER, PROBS_LAYER = "temperature", "probs"
# Heads trained for the out-of-fold predictions when validation holds no error: each
# image is then predicted by a head that saw 80% of the others, on cached features.
OUT_OF_FOLD_FOLDS = 5


# ----- the figures (pure numpy) -------------------------------------------------------


@dataclass(frozen=True)
class Scores:
    """How well probabilities are calibrated on one labelled set."""

    ece: float
    nll: float


def scores(probs: np.ndarray, labels: np.ndarray) -> Scores:
    """ECE and NLL of `probs` against `labels`."""
    return Scores(expected_calibration_error(probs, labels), negative_log_likelihood(probs, labels))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T), in float64 and stable for large logits."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def logits_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """The exact NLL of softmax(logits / T) (log-sum-exp, no clipping): what T minimises."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    peak = z.max(axis=1, keepdims=True)
    log_norm = peak[:, 0] + np.log(np.exp(z - peak).sum(axis=1))
    return float((log_norm - z[np.arange(len(labels)), labels]).mean())


# ----- fitting T --------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """The temperature and why it is that one; `errors`: how many held-out answers were wrong."""

    temperature: float
    reason: str
    errors: int = 0


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    bounds=T_BOUNDS,
    tol: float = 1e-4,
    images: str = "validation images",
) -> Fit:
    """T minimising the NLL of softmax(logits / T) on held-out `labels`; 1 when they hold no error.

    A golden-section search on log T within `bounds`: the NLL is convex in 1/T, hence
    unimodal in log T, and one dimension needs nothing more than numpy.
    """
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if len(labels) == 0:
        return Fit(1.0, "no held-out images to fit on: T = 1 (uncalibrated)")
    errors = int((logits.argmax(axis=1) != labels).sum())
    if errors == 0:
        return Fit(
            1.0,
            f"the {len(labels)} {images} hold no error, so the NLL would push T towards 0 "
            "(every answer at probability 1): T = 1 (uncalibrated)",
        )
    low, high = math.log(bounds[0]), math.log(bounds[1])
    best = math.exp(_golden_section(lambda s: logits_nll(logits, labels, math.exp(s)), low, high, tol))
    before, after = logits_nll(logits, labels, 1.0), logits_nll(logits, labels, best)
    return Fit(
        best,
        f"fitted on {len(labels)} {images} with {errors} errors: NLL {before:.4f} -> {after:.4f}",
        errors,
    )


def _golden_section(f, low: float, high: float, tol: float) -> float:
    """The minimiser of a unimodal `f` on [low, high], within `tol`."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2


# ----- the model: its logits, and its probabilities at T ----------------------------------


def with_temperature(model, temperature: float):
    """A copy of `model` (weights included) whose softmax reads logits / `temperature`.

    The model's head must end in the `temperature` Rescaling layer (training/model.py).
    """
    found = []

    def set_scale(layer: dict) -> None:
        if layer.get("class_name") == "Rescaling" and layer["config"].get("name") == TEMPERATURE_LAYER:
            layer["config"]["scale"] = 1.0 / temperature
            found.append(layer)

    copy = _rebuilt(model, set_scale)
    if not found:
        raise ValueError(f"model {model.name!r} has no {TEMPERATURE_LAYER!r} layer to calibrate")
    return copy


def logits_model(model):
    """A copy of `model` that outputs logits (its final softmax made linear).

    Works on heads that end in Activation `probs` and on older ones whose Dense `probs`
    has the softmax built in. Any temperature layer stays as it is.
    """
    found = []

    def linear(layer: dict) -> None:
        config = layer.get("config", {})
        if config.get("name") == PROBS_LAYER and layer.get("class_name") in ("Activation", "Dense"):
            config["activation"] = "linear"
            found.append(layer)

    copy = _rebuilt(model, linear)
    if not found:
        raise ValueError(f"model {model.name!r} has no {PROBS_LAYER!r} layer")
    return copy


def _rebuilt(model, edit):
    """The model rebuilt from its own config after `edit` visited each layer's config
    (nested models included), with the original's weights."""
    import keras

    config = keras.saving.serialize_keras_object(model)
    _visit_layers(config, edit)
    copy = keras.saving.deserialize_keras_object(config)
    copy.set_weights(model.get_weights())
    return copy


def _visit_layers(node, edit) -> None:
    if isinstance(node, dict):
        if "class_name" in node and isinstance(node.get("config"), dict):
            edit(node)
        for value in node.values():
            _visit_layers(value, edit)
    elif isinstance(node, list):
        for value in node:
            _visit_layers(value, edit)


def current_temperature(model) -> float:
    """The T a model's `temperature` layer applies (1.0 for models without one)."""
    for layer in _walk(model):
        if layer.name == TEMPERATURE_LAYER:
            return 1.0 / float(layer.scale)
    return 1.0


def _walk(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _walk(layer)


def predict_logits(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of a batched (images, labels) dataset, in order."""
    outputs, labels = [], []
    for images, batch_labels in dataset:
        outputs.append(np.asarray(model(images, training=False), dtype=np.float64))
        labels.append(np.asarray(batch_labels))
    if not outputs:
        return np.zeros((0, 0)), np.zeros((0,), dtype=int)
    return np.concatenate(outputs), np.concatenate(labels)


def head_logits(model, features: np.ndarray, batch: int = 256) -> np.ndarray:
    """The logits of `model`'s head on cached backbone features (the backbone is frozen,
    so they are the whole model's logits on the images the features came from)."""
    raw = logits_model(model.get_layer("head"))
    chunks = np.array_split(features, max(1, -(-len(features) // batch)))
    return np.concatenate([np.asarray(raw(chunk, training=False), dtype=np.float64) for chunk in chunks])


# ----- one run's calibration ---------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """T, why, and the figures before and after on validation and test."""

    temperature: float
    reason: str
    val_before: Scores
    val_after: Scores
    test_before: Scores
    test_after: Scores

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: calibration.temperature, calibration.{val,test}_{ece,nll}_{before,after}."""
        out = {"calibration.temperature": self.temperature}
        for split in ("val", "test"):
            for when in ("before", "after"):
                figures = getattr(self, f"{split}_{when}")
                out[f"calibration.{split}_ece_{when}"] = figures.ece
                out[f"calibration.{split}_nll_{when}"] = figures.nll
        return out


@dataclass
class Calibrated:
    """The calibrated model, the report, and the test evaluation of the calibrated model."""

    model: object
    report: Report
    test: object  # training.evaluate.Evaluation, its probabilities softmax(logits / T)
    test_probs_before: np.ndarray


def calibrate(
    model,
    val,
    test,
    class_names: list[str],
    out_of_fold=None,
    val_logits=None,
    images: str = "validation images",
    test_images: int | None = None,
) -> Calibrated:
    """Fit T on the validation split's logits, and evaluate on the test split once.

    One pass over each split, through a copy of the model that outputs logits: the test
    probabilities before and after are both computed from the same logits. When the
    validation split holds no error, `out_of_fold()` (if given) returns held-out
    (logits, labels) to fit on instead, or None (see `out_of_fold_logits`). `val_logits`:
    the validation split's (logits, labels) when the caller has them already
    (`head_logits` on cached features), so the backbone does not run over it again, or
    held-out ones (an ensemble's cross-fitted heads, training/folds.py): `images` says
    which, in the reason. `out_of_fold()` may add a third element: where its logits came from.
    `test_images`: the test split's size, for the evaluation's progress (evaluate_model).
    """
    raw = logits_model(model)
    val_logits, val_labels = val_logits if val_logits is not None else predict_logits(raw, val)
    fit = fit_temperature(val_logits, val_labels, images=images)
    if fit.errors == 0 and len(val_labels) and out_of_fold is not None:
        fit = _fit_out_of_fold(out_of_fold, fit)
    log.info("calibration: T = %.3f (%s)", fit.temperature, fit.reason)
    test_logits = evaluate_model(raw, test, class_names, total=test_images)  # y_prob holds logits here
    before, after = softmax(test_logits.y_prob), softmax(test_logits.y_prob, fit.temperature)
    evaluation = dataclasses.replace(test_logits, y_prob=after.astype("float32"))
    report = Report(
        temperature=fit.temperature,
        reason=fit.reason,
        val_before=_scores_at(val_logits, val_labels, 1.0),
        val_after=_scores_at(val_logits, val_labels, fit.temperature),
        test_before=scores(before, evaluation.y_true),
        test_after=scores(after, evaluation.y_true),
    )
    calibrated = model if fit.temperature == 1.0 else with_temperature(model, fit.temperature)
    return Calibrated(calibrated, report, evaluation, before.astype("float32"))


def _fit_out_of_fold(out_of_fold, no_error: Fit) -> Fit:
    held_out = out_of_fold()
    if held_out is None:
        return no_error
    logits, labels, *given = held_out
    fit = fit_temperature(logits, labels)
    if fit.errors == 0:
        return Fit(1.0, f"{no_error.reason}; the out-of-fold predictions hold no error either")
    where = (
        given[0]
        if given
        else f"{OUT_OF_FOLD_FOLDS} heads on the cached backbone features of train + validation"
    )
    reason = (
        f"the validation split holds no error; {fit.reason.replace('validation', 'out-of-fold')} ({where})"
    )
    return Fit(fit.temperature, reason, fit.errors)


def out_of_fold_logits(model, splits, config, num_classes: int, members=None):
    """Held-out (logits, labels) of train + validation, from heads trained on the other folds
    of their cached backbone features; None for a model without a frozen backbone (or
    fewer than two images a fold).

    Each of the OUT_OF_FOLD_FOLDS heads is built and trained as the run's own head (same
    config, learning rate, batch size, epochs; early stopping on its training loss), so
    the held-out answers are as confident as the model's own on images it never saw. For
    an ensemble, `members` holds each member's run config: every fold trains a head of
    each (as above: its head and learning rate, Adam, no smoothing or decay) and averages
    their logits, as the model does; K members cost K fits a fold.
    """
    from training.features import backbone_function, run_backbone
    from training.model import feature_extractor

    extractor = feature_extractor(model)
    if extractor is None:
        return None
    forward = backbone_function(extractor)  # one graph for both splits
    features, labels = zip(
        *(run_backbone(forward, split) for split in (splits.train, splits.val)), strict=True
    )
    x, y = np.concatenate(features), np.concatenate(labels)
    if len(y) < 2 * OUT_OF_FOLD_FOLDS:
        return None  # too few images to hold any out
    folds = np.random.default_rng(config.seed).permutation(len(y)) % OUT_OF_FOLD_FOLDS
    logits = np.zeros((len(y), num_classes))
    for k in range(OUT_OF_FOLD_FOLDS):
        held_out = [
            _fold_logits(member, x[folds != k], y[folds != k], x[folds == k], num_classes)
            for member in members or [config]
        ]
        logits[folds == k] = np.mean(held_out, axis=0)
    log.info("calibration: out-of-fold predictions of %d images, %d errors", len(y),
             int((logits.argmax(axis=1) != y).sum()))  # fmt: skip
    return logits, y


def _fold_logits(config, x, y, held_out, num_classes: int) -> np.ndarray:
    """Logits on `held_out` of a head of `config` trained on (x, y)."""
    import keras

    from training.model import build_head

    head = build_head(config.head, x.shape[1:], num_classes)
    head.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate), loss="sparse_categorical_crossentropy"
    )
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=config.early_stopping_patience)
    head.fit(x, y, batch_size=config.batch_size, epochs=config.epochs, callbacks=[stop], verbose=0)
    return np.asarray(logits_model(head).predict_on_batch(held_out))


def _scores_at(logits: np.ndarray, labels: np.ndarray, temperature: float) -> Scores:
    return scores(softmax(logits, temperature), labels) if len(labels) else Scores(0.0, 0.0)


def log_calibration(calibrated: Calibrated) -> None:
    """T, the figures before and after, the reason and the reliability diagram, to the active run."""
    import mlflow

    from training import tracking

    report = calibrated.report
    mlflow.log_metrics(report.metrics())
    mlflow.set_tag("calibration.reason", report.reason)
    figure = reliability_figure(
        calibrated.test_probs_before, calibrated.test.y_prob, calibrated.test.y_true, report.temperature
    )
    tracking.log_figure(figure, "reliability_diagram")
    log.info(
        "calibration on the test split: ECE %.4f -> %.4f, NLL %.4f -> %.4f",
        report.test_before.ece,
        report.test_after.ece,
        report.test_before.nll,
        report.test_after.nll,
    )


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS):
    """(bin centres, accuracy, mean confidence, count) per confidence bin; NaN where empty."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    accuracy, mean_conf, count = np.full(bins, np.nan), np.full(bins, np.nan), np.zeros(bins, int)
    for b in range(bins):
        member = index == b
        count[b] = int(member.sum())
        if count[b]:
            accuracy[b], mean_conf[b] = correct[member].mean(), confidence[member].mean()
    return (edges[:-1] + edges[1:]) / 2, accuracy, mean_conf, count


def reliability_figure(before: np.ndarray, after: np.ndarray, labels: np.ndarray, temperature: float):
    """Reliability diagrams of the test split, before and after scaling by T (side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(9, 4.2), dpi=100)
    panels = ((before, "before (T = 1)"), (after, f"after (T = {temperature:.3f})"))
    for i, (probs, title) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 2, i)
        centres, accuracy, confidence, count = reliability_bins(probs, labels)
        width = 1.0 / len(centres)
        ax.bar(centres, np.nan_to_num(accuracy), width=width, edgecolor="black", label="accuracy")
        ax.bar(centres, np.nan_to_num(confidence - accuracy), bottom=np.nan_to_num(accuracy), width=width,
               color="red", alpha=0.3, label="gap to confidence")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_ylabel("accuracy")
        s = scores(probs, labels) if len(labels) else Scores(0.0, 0.0)
        ax.set_title(f"{title}\nECE {s.ece:.4f}, NLL {s.nll:.4f}, n = {int(count.sum())}", fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return fig
