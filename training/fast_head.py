"""The head's training in NumPy, for search trials on cached features.

A Keras fit of a small dense head costs about a second of tracing and set-up before its
first step; twenty of them would cost as much as the backbone pass the cache saved. A
trial here trains the same head (pooling -> Dense(units, relu) -> Dropout -> Dense
softmax, Glorot-uniform initialisation) with the same optimiser (Adam, or AdamW with
decoupled weight decay, Keras' update rule and epsilon), label smoothing, class weights,
batch size, shuffling per epoch, early stopping on validation loss with the best weights
restored, and the learning rate halved on a plateau, as `training/train.py` does in
Keras. The run's model is still trained by Keras with the chosen configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Keras' defaults: Adam's epsilon, ReduceLROnPlateau's factor and min_delta.
_EPSILON = 1e-7
_LR_FACTOR = 0.5
_LR_MIN_DELTA = 1e-4


@dataclass(frozen=True)
class HeadParams:
    """One trial's configuration of the head and its optimiser."""

    pooling: str
    units: int  # 0 = no hidden layer (softmax on the pooled features)
    dropout: float
    learning_rate: float
    weight_decay: float
    label_smoothing: float


@dataclass(frozen=True)
class Schedule:
    """What the head phase of the run does: epochs, batch, early stopping, plateau."""

    epochs: int
    batch_size: int
    patience: int
    reduce_lr_patience: int


@dataclass
class TrialFit:
    """Validation outcome of one trial at its restored (lowest val_loss) epoch, and the
    head's weights there: [kernel, bias] per Dense layer, in the order of the Keras head's
    `get_weights()` (training/model.py build_head)."""

    val_probs: np.ndarray
    val_loss: float
    val_accuracy: float
    epochs: int
    best_epoch: int
    weights: list[np.ndarray]


def pool(maps: np.ndarray, pooling: str) -> np.ndarray:
    """(n, h, w, c) feature maps -> (n, d) vectors, as the head's pooling layer does."""
    if pooling == "avg":
        return maps.mean(axis=(1, 2), dtype="float32")
    if pooling == "max":
        return maps.max(axis=(1, 2))
    return maps.reshape(len(maps), -1)


def fit_trial(train, val, classes: int, params: HeadParams, schedule: Schedule, class_weight, seed: int):
    """Train one head on pooled features; `train` is a list of (x, y) passes (epoch e uses
    pass e mod K), `val` one (x, y). Returns the TrialFit of the best epoch."""
    rng = np.random.default_rng(seed)
    weights = _init(train[0][0].shape[1], params.units, classes, rng)
    adam = _Adam(weights, params.learning_rate, params.weight_decay)
    sample_weight = _sample_weights(class_weight, classes)
    buffers = [np.empty_like(w) for w in weights]
    best, best_loss, stale, plateau, plateau_best = None, np.inf, 0, 0, np.inf
    epoch = 0
    for epoch in range(schedule.epochs):
        x, y = train[epoch % len(train)]
        order, b = rng.permutation(len(x)), schedule.batch_size
        for rows in (order[i : i + b] for i in range(0, len(x), b)):
            grads = _gradients(
                weights, x[rows], y[rows], classes, params, sample_weight[y[rows]], rng, buffers
            )
            adam.step(weights, grads)
        probs = _forward(weights, val[0])[-1]
        loss = _cross_entropy(probs, val[1], classes, params.label_smoothing)
        if loss < best_loss:
            best, best_loss, stale = (probs, epoch, [w.copy() for w in weights]), loss, 0
        else:
            stale += 1
        if loss < plateau_best - _LR_MIN_DELTA:
            plateau_best, plateau = loss, 0
        else:
            plateau += 1
            if plateau >= schedule.reduce_lr_patience:
                adam.learning_rate *= _LR_FACTOR
                plateau = 0
        if stale >= schedule.patience:
            break
    probs, best_epoch, best_weights = best
    accuracy = float((probs.argmax(axis=1) == val[1]).mean())
    return TrialFit(probs, float(best_loss), accuracy, epoch + 1, best_epoch + 1, best_weights)


def _init(inputs: int, units: int, classes: int, rng) -> list[np.ndarray]:
    """Glorot-uniform kernels, zero biases: [W1, b1, W2, b2] or [W, b] without a hidden layer."""
    sizes = [inputs, units, classes] if units else [inputs, classes]
    weights = []
    for fan_in, fan_out in zip(sizes, sizes[1:], strict=False):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        weights += [rng.uniform(-limit, limit, (fan_in, fan_out)).astype("float32")]
        weights += [np.zeros(fan_out, dtype="float32")]
    return weights


def _forward(weights, x, keep=None):
    """Activations: (probs,) without a hidden layer, else (z1, h, probs); `keep` is the
    dropout mask already scaled by 1/(1-rate)."""
    if len(weights) == 2:
        return (_softmax(x @ weights[0] + weights[1]),)
    z1 = x @ weights[0] + weights[1]
    h = np.maximum(z1, 0)
    if keep is not None:
        h = h * keep
    return z1, h, _softmax(h @ weights[2] + weights[3])


def _gradients(weights, x, y, classes, params: HeadParams, sample_weight, rng, out):
    """The loss's gradients per weight; the kernels' land in `out`'s arrays (reused)."""
    keep = None
    if len(weights) == 4 and params.dropout:
        keep = (rng.random((len(x), params.units)) >= params.dropout) / np.float32(1 - params.dropout)
    *hidden, probs = _forward(weights, x, keep)
    # d(mean of weighted cross-entropy)/d(logits), Keras' sum_over_batch_size reduction.
    dz = (probs - _smoothed(y, classes, params.label_smoothing)) * (sample_weight / len(x))[:, None]
    if not hidden:
        return [np.matmul(x.T, dz, out=out[0]), dz.sum(axis=0)]
    z1, h = hidden
    dh = dz @ weights[2].T
    if keep is not None:
        dh *= keep
    dh *= z1 > 0
    return [np.matmul(x.T, dh, out=out[0]), dh.sum(axis=0), np.matmul(h.T, dz, out=out[2]), dz.sum(axis=0)]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _smoothed(y: np.ndarray, classes: int, smoothing: float) -> np.ndarray:
    onehot = np.eye(classes, dtype="float32")[y]
    return onehot * (1 - smoothing) + smoothing / classes


def _cross_entropy(probs, y, classes, smoothing) -> float:
    """Validation loss as Keras reports it for the compiled loss (smoothed when it is)."""
    target = _smoothed(y, classes, smoothing)
    return float(-(target * np.log(np.clip(probs, 1e-7, 1.0))).sum(axis=1).mean())


def _sample_weights(class_weight: dict[int, float] | None, classes: int) -> np.ndarray:
    if not class_weight:
        return np.ones(classes, dtype="float32")
    return np.array([class_weight.get(c, 1.0) for c in range(classes)], dtype="float32")


class _Adam:
    """Keras' Adam/AdamW update: decoupled decay w -= lr*wd*w, then the bias-corrected step."""

    def __init__(self, weights, learning_rate: float, weight_decay: float):
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.m = [np.zeros_like(w) for w in weights]
        self.v = [np.zeros_like(w) for w in weights]
        # One scratch array per weight: every update below runs in place. A new array of a
        # kernel's size each time would cost a page-faulting allocation per operation
        # (it halves a trial's time on a 1,024 x 512 kernel).
        self.scratch = [np.empty_like(w) for w in weights]
        self.t = 0

    def step(self, weights, grads) -> None:
        self.t += 1
        lr = self.learning_rate
        alpha = lr * math.sqrt(1 - 0.999**self.t) / (1 - 0.9**self.t)
        for w, g, m, v, s in zip(weights, grads, self.m, self.v, self.scratch, strict=True):
            if self.weight_decay:
                w *= 1 - lr * self.weight_decay  # w -= lr * wd * w
            np.subtract(g, m, out=s)  # m += (g - m) * (1 - beta_1)
            s *= 0.1
            m += s
            np.multiply(g, g, out=s)  # v += (g^2 - v) * (1 - beta_2)
            s -= v
            s *= 0.001
            v += s
            np.sqrt(v, out=s)  # w -= alpha * m / (sqrt(v) + epsilon)
            s += _EPSILON
            np.divide(m, s, out=s)
            s *= alpha
            w -= s
