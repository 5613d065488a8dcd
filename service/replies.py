"""What the model process answers the HTTP front, so no answer can mix two versions.

The front resizes an upload to the input size it last heard of and sends the pixels. The
model process reads the served model once per batch and answers each image with the
version, class names and input size of the model that computed it, or, if the image
has another size than that model takes (a swap happened meanwhile), with a `stale` reply
carrying the new size, so the front resizes again from its decoded pixels and retries.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.predictor import Predictor


def classify_replies(predictor: Predictor, images: list[np.ndarray]) -> list[dict[str, Any]]:
    """One reply per (H, W, 3) image, all computed by `predictor` in one forward pass."""
    size = tuple(predictor.card.image_size)
    fits = [i for i, image in enumerate(images) if tuple(np.shape(image)[:2]) == size]
    replies: list[dict[str, Any]] = [stale_reply(predictor)] * len(images)
    if fits:
        probs = predictor.probabilities(np.stack([images[i] for i in fits]))
        origin = _origin(predictor)
        for i, row in zip(fits, probs, strict=True):
            replies[i] = {**origin, "probabilities": row, "batch": len(fits)}
    return replies


def stale_reply(predictor: Predictor) -> dict[str, Any]:
    """The answer to an image prepared for a model that is no longer served."""
    return {"stale": True, **_origin(predictor)}


def _origin(predictor: Predictor) -> dict[str, Any]:
    card = predictor.card
    return {
        "model": predictor.name,
        "version": predictor.version,
        "class_names": list(card.class_names),
        "image_size": list(card.image_size),
    }


def one_version(replies: list[dict[str, Any]]) -> bool:
    """Whether every reply was computed (none stale) by the same version."""
    return not any(r.get("stale") for r in replies) and len({r["version"] for r in replies}) == 1
