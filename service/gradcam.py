"""Grad-CAM over a model's last Conv2D, on any Keras backend, and its PNG overlay.

The model is split at the last convolution into `to_conv` (input -> feature map A) and
`from_conv` (A -> probabilities); the gradient of the class score with respect to A is
taken with the backend's own autodiff (a small per-backend helper). The last Conv2D may
sit inside a nested backbone (keras.applications models are nested Functional models
after augmentation and preprocessing layers): the outer model is then replayed layer by
layer, which assumes it is a chain, as every imgcls classifier is.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# The overlay is for eyes, not for a model: no need to ship a 40 MP PNG back.
MAX_OVERLAY_SIDE = 512
HEAT_WEIGHT = 0.45  # share of the heat-map colour in the overlay


@dataclass(frozen=True)
class ConvSplit:
    """A model cut at its last Conv2D: x -> (A, context) and (A, context) -> output."""

    to_conv: Callable[[Any], tuple[Any, Any]]
    from_conv: Callable[[Any, Any], Any]
    layer_name: str


def find_last_conv(model: Any) -> tuple[Any, Any]:
    """(container, conv layer): the last Conv2D and the model that directly holds it."""
    import keras

    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.Conv2D):
            return model, layer
        if hasattr(layer, "layers"):
            try:
                return find_last_conv(layer)
            except ValueError:
                continue
    raise ValueError(f"model {model.name!r} has no Conv2D layer: Grad-CAM needs one")


def split_at_last_conv(model: Any) -> ConvSplit:
    """Cut `model` at its last Conv2D, recursing into the nested model that holds it."""
    import keras

    container, conv = find_last_conv(model)
    if container is model:
        to_conv = keras.Model(model.inputs, conv.output)
        # Keras allows an intermediate tensor as an input: the graph is cut there,
        # and skip connections around the conv still read from the model's input.
        from_conv = keras.Model([model.inputs[0], conv.output], model.output)
        return ConvSplit(
            to_conv=lambda x: (to_conv(x, training=False), x),
            from_conv=lambda a, x: from_conv([x, a], training=False),
            layer_name=conv.name,
        )
    return _split_chain(model, conv.name)


def _split_chain(model: Any, conv_name: str) -> ConvSplit:
    """Split a chain model whose layer `inner` contains the last conv somewhere inside."""
    layers = [layer for layer in model.layers if not _is_input_layer(layer)]
    index = next(i for i, layer in enumerate(layers) if _contains(layer, conv_name))
    before, inner, after = layers[:index], split_at_last_conv(layers[index]), layers[index + 1 :]

    def to_conv(x: Any) -> tuple[Any, Any]:
        for layer in before:
            x = layer(x, training=False)
        return inner.to_conv(x)

    def from_conv(a: Any, context: Any) -> Any:
        y = inner.from_conv(a, context)
        for layer in after:
            y = layer(y, training=False)
        return y

    return ConvSplit(to_conv=to_conv, from_conv=from_conv, layer_name=conv_name)


def _is_input_layer(layer: Any) -> bool:
    import keras

    return isinstance(layer, keras.layers.InputLayer)


def _contains(layer: Any, name: str) -> bool:
    """Whether `layer` is, or nests, the layer called `name`."""
    if layer.name == name:
        return True
    return any(_contains(sub, name) for sub in getattr(layer, "layers", []))


def gradcam_heatmap(split: ConvSplit, image: np.ndarray, class_index: int) -> np.ndarray:
    """Grad-CAM of one (H, W, 3) model input for `class_index`: (h, w) floats in [0, 1]."""
    import keras

    batch = keras.ops.convert_to_tensor(image[None].astype(np.float32))
    features, context = split.to_conv(batch)

    def class_score(a: Any) -> Any:
        # Log-probability: same direction as the logit, and it does not saturate at p=1.
        probs = split.from_conv(a, context)
        return keras.ops.log(probs[0, class_index] + 1e-12)

    grads = keras.ops.convert_to_numpy(backend_gradient(class_score, features))[0]
    fmap = keras.ops.convert_to_numpy(features)[0]
    weights = grads.mean(axis=(0, 1))
    cam = np.maximum((fmap * weights).sum(axis=-1), 0.0)
    peak = float(cam.max())
    return (cam / peak if peak > 0 else cam).astype(np.float32)


def backend_gradient(fn: Callable[[Any], Any], value: Any) -> Any:
    """d fn(value) / d value for a scalar `fn`, with the active Keras backend's autodiff."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # only on this backend; serving never needs it otherwise

        value = tf.convert_to_tensor(value)
        with tf.GradientTape() as tape:
            tape.watch(value)
            score = fn(value)
        return tape.gradient(score, value)
    if backend == "jax":
        import jax

        return jax.grad(fn)(value)
    if backend == "torch":
        import torch

        value = torch.as_tensor(value).detach().requires_grad_(True)
        fn(value).backward()
        return value.grad
    raise NotImplementedError(f"Grad-CAM has no gradient helper for backend {backend!r}")


def overlay_png(pixels: np.ndarray, heatmap: np.ndarray) -> bytes:
    """The heat-map, coloured and blended over the (H, W, 3) uint8 image, as PNG bytes."""
    base = Image.fromarray(np.asarray(pixels, dtype=np.uint8), "RGB")
    base.thumbnail((MAX_OVERLAY_SIDE, MAX_OVERLAY_SIDE), Image.Resampling.BILINEAR)
    heat = Image.fromarray(np.uint8(np.clip(heatmap, 0, 1) * 255), "L")
    heat = np.asarray(heat.resize(base.size, Image.Resampling.BILINEAR), np.float32) / 255
    blended = (1 - HEAT_WEIGHT) * np.asarray(base, np.float32) + HEAT_WEIGHT * _jet(heat)
    out = io.BytesIO()
    Image.fromarray(np.uint8(np.clip(blended, 0, 255)), "RGB").save(out, format="PNG")
    return out.getvalue()


def _jet(values: np.ndarray) -> np.ndarray:
    """The 'jet' colour map (blue -> cyan -> yellow -> red) of [0, 1] values, 0-255 RGB."""
    v = values[..., None]
    channels = np.concatenate([1.5 - np.abs(4 * v - c) for c in (3.0, 2.0, 1.0)], axis=-1)
    return np.clip(channels, 0, 1) * 255
