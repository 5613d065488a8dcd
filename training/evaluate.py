"""Held-out evaluation: metrics users compare runs on, and the pictures that explain them."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

log = logging.getLogger(__name__)

ECE_BINS = 15  # the usual choice since Guo et al.; fine enough for a few hundred images
# Keras' cross-entropy clips probabilities at 1e-7 too: reported NLLs read like val_loss.
PROBABILITY_FLOOR = 1e-7


@dataclass
class Evaluation:
    """Predictions and metrics of one model on one labelled set."""

    class_names: list[str]
    y_true: np.ndarray
    y_prob: np.ndarray
    # The first few misclassified images and their positions, for the picture of them.
    wrong_images: np.ndarray | None = None
    wrong_index: list[int] = field(default_factory=list)

    @property
    def y_pred(self) -> np.ndarray:
        return self.y_prob.argmax(axis=1)

    def metrics(self) -> dict[str, float]:
        """accuracy, macro_f1, ece and nll (calibration: lower is better), and
        precision/recall/f1 per class (`recall_<class>`, ...)."""
        labels = list(range(len(self.class_names)))
        precision, recall, f1, _ = precision_recall_fscore_support(
            self.y_true, self.y_pred, labels=labels, zero_division=0
        )
        out = {
            "accuracy": float(accuracy_score(self.y_true, self.y_pred)),
            "macro_f1": float(
                f1_score(self.y_true, self.y_pred, labels=labels, average="macro", zero_division=0)
            ),
            "ece": expected_calibration_error(self.y_prob, self.y_true),
            "nll": negative_log_likelihood(self.y_prob, self.y_true),
        }
        for i, name in enumerate(self.class_names):
            key = metric_safe(name)
            out[f"precision_{key}"] = float(precision[i])
            out[f"recall_{key}"] = float(recall[i])
            out[f"f1_{key}"] = float(f1[i])
        return out

    def per_class_recall(self) -> dict[str, float]:
        """Recall per class name (for the promotion gate's per-class bound)."""
        metrics = self.metrics()
        return {name: metrics[f"recall_{metric_safe(name)}"] for name in self.class_names}

    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.y_true, self.y_pred, labels=list(range(len(self.class_names))))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the mean |accuracy - confidence| over equal-width confidence bins (lo, hi],
    weighted by the share of predictions in each bin."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if len(labels) == 0:
        return 0.0
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    index = np.clip(np.searchsorted(np.linspace(0, 1, bins + 1), confidence, side="left") - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        member = index == b
        if member.any():
            total += member.sum() * abs(correct[member].mean() - confidence[member].mean())
    return float(total / len(labels))


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class), probabilities clipped at PROBABILITY_FLOOR (as Keras' loss)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if len(labels) == 0:
        return 0.0
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, PROBABILITY_FLOOR, 1.0)).mean())


def metric_safe(name: str) -> str:
    """A class name usable inside an MLflow metric key."""
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", name)


def evaluate_model(
    model, dataset, class_names: list[str], keep_wrong: int = 24, total: int | None = None
) -> Evaluation:
    """Run `model` over a batched (images, labels) dataset; order is preserved.

    Calls the model directly (inference mode): no tf.distribute splitting of batches.
    Keeps at most `keep_wrong` misclassified images, never the whole set. `total`: the
    dataset's images, for the progress shown on the terminal or in the log (imgcls/progress.py);
    by default the files of a dataset read by Keras from a folder (`file_paths`), if it has them.
    """
    from imgcls.progress import Progress

    total = total if total is not None else len(getattr(dataset, "file_paths", ())) or None
    probs, labels, wrong, wrong_index, seen = [], [], [], [], 0
    with Progress("evaluation", total, logger=log) as progress:
        for images, batch_labels in dataset:
            batch_probs = np.asarray(model(images, training=False))
            batch_labels = np.asarray(batch_labels)
            for i in np.flatnonzero(batch_probs.argmax(axis=1) != batch_labels)[: keep_wrong - len(wrong)]:
                wrong.append(np.asarray(images[i]))
                wrong_index.append(seen + int(i))
            probs.append(batch_probs)
            labels.append(batch_labels)
            seen += len(batch_labels)
            progress.advance(len(batch_labels))
    return Evaluation(
        class_names,
        np.concatenate(labels),
        np.concatenate(probs).astype("float32"),
        np.stack(wrong) if wrong else None,
        wrong_index,
    )


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(width, height), dpi=100)


def confusion_figure(evaluation: Evaluation):
    """Confusion matrix with counts, true classes down, predicted across."""
    matrix = evaluation.confusion()
    n = len(evaluation.class_names)
    fig = _figure(2 + 0.6 * n, 1.6 + 0.6 * n)
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), evaluation.class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), evaluation.class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=8)
    ax.set_title(f"accuracy {evaluation.metrics()['accuracy']:.3f}")
    fig.tight_layout()
    return fig


def curves_figure(history: dict[str, list[float]]):
    """Loss and accuracy per epoch, training vs validation (both phases)."""
    fig = _figure(10, 4)
    for index, metric in enumerate(("loss", "accuracy"), start=1):
        ax = fig.add_subplot(1, 2, index)
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if history.get(key):
                ax.plot(range(1, len(history[key]) + 1), history[key], style, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    return fig


def image_grid_figure(images: np.ndarray, titles: list[str], columns: int = 6):
    """A grid of raw 0-255 images with a title each."""
    rows = max(1, -(-len(images) // columns))
    fig = _figure(columns * 1.6, rows * 1.8)
    for i, (image, title) in enumerate(zip(images, titles, strict=False)):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(np.clip(np.asarray(image), 0, 255).astype("uint8"))
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    return fig


def augmentation_figure(augmentation, images: np.ndarray, copies: int = 5):
    """Each row: an original training image, then `copies` random augmentations of it."""
    originals = np.asarray(images[:4])
    # One call for every copy: the random layers draw each image's transform on their own
    # (20 eager calls of one image each cost about a second at 224 px).
    augmented = np.asarray(augmentation(np.repeat(originals, copies, axis=0), training=True))
    rows, titles = [], []
    for i, image in enumerate(originals):
        rows += [image, *augmented[i * copies : (i + 1) * copies]]
        titles += ["original", *(f"augmented {k + 1}" for k in range(copies))]
    return image_grid_figure(np.stack(rows), titles, columns=copies + 1)


def misclassified_figure(evaluation: Evaluation):
    """Test images the model got wrong, titled 'predicted (p) / true'."""
    if evaluation.wrong_images is None:
        return None
    names, pred, prob, true = evaluation.class_names, evaluation.y_pred, evaluation.y_prob, evaluation.y_true
    titles = [
        f"{names[pred[i]]} ({prob[i].max():.2f})\ntrue: {names[true[i]]}" for i in evaluation.wrong_index
    ]
    return image_grid_figure(evaluation.wrong_images, titles)


def first_conv_layer(model):
    """The first trainable-looking Conv2D with 3 input channels (kernels worth showing)."""
    import keras

    for layer in _walk_layers(model):
        if isinstance(layer, keras.layers.Conv2D) and layer.name != "caffe_preprocess":
            return layer
    return None


def _walk_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from _walk_layers(layer)
        else:
            yield layer


def kernels_figure(model, limit: int = 32):
    """The first convolution's kernels as small RGB tiles: what the first layer looks for."""
    layer = first_conv_layer(model)
    if layer is None:
        return None
    kernel = np.asarray(layer.get_weights()[0])  # (kh, kw, in, out)
    count = min(limit, kernel.shape[-1])
    tiles = []
    for i in range(count):
        k = kernel[..., i]
        k = (k - k.min()) / (np.ptp(k) or 1.0) * 255.0
        tiles.append(np.repeat(k, 3, axis=-1) if k.shape[-1] == 1 else k[..., :3])
    return image_grid_figure(np.stack(tiles), [f"{layer.name}:{i}" for i in range(count)], columns=8)


def activations_figure(model, image: np.ndarray, limit: int = 16):
    """Activation maps of the first convolution for one image: where each filter fires."""
    import keras

    layer = first_conv_layer(model)
    if layer is None:
        return None
    probe = keras.Model(model.input, _layer_output_in(model, layer))
    maps = np.asarray(probe(image[None].astype("float32"), training=False))[0]
    count = min(limit, maps.shape[-1])
    fig = _figure(8, 2 + 2 * -(-count // 8))
    ax = fig.add_subplot(-(-count // 8) + 1, 8, 1)
    ax.imshow(np.clip(image, 0, 255).astype("uint8"))
    ax.set_title("input", fontsize=7)
    ax.axis("off")
    for i in range(count):
        ax = fig.add_subplot(-(-count // 8) + 1, 8, 9 + i)
        ax.imshow(maps[..., i], cmap="viridis")
        ax.set_title(f"filter {i}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    return fig


def _layer_output_in(model, target):
    """The symbolic output of `target` in `model`'s own graph, re-tracing nested models."""
    x = model.input
    for layer in model.layers[1:]:
        if layer is target:
            return layer(x)
        if hasattr(layer, "layers") and target in list(_walk_layers(layer)):
            return _layer_output_in_nested(layer, target, x)
        if layer.name != "augmentation":
            x = layer(x, training=False)
    raise ValueError(f"layer {target.name} not found")


def _layer_output_in_nested(submodel, target, x):
    for layer in submodel.layers:
        if isinstance(layer, type(submodel.input)) or layer.__class__.__name__ == "InputLayer":
            continue
        x = layer(x, training=False)
        if layer is target:
            return x
    raise ValueError(f"layer {target.name} not found in {submodel.name}")
