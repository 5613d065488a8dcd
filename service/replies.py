"""What the model process answers the HTTP front, so no answer can mix two versions.

The front resizes an upload to each input size the model workers answered with lately
(one in steady state; two while the workers of a replica, each following on its own,
disagree for up to a poll interval) and sends those candidates. The model process reads
the served model once per batch and answers each image from the candidate of its model's
size, with the version, class names and input size of the model that computed it; with
no such candidate (a swap happened meanwhile) it answers `stale` with the new size, so
the front resizes again from the upload and retries.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from service.predictor import Predictor


def fitting(predictor: Predictor, candidates: list[np.ndarray]) -> np.ndarray | None:
    """The candidate (H, W, 3) image of the predictor's input size, if one was sent."""
    size = tuple(predictor.card.image_size)
    return next((c for c in candidates if tuple(np.shape(c)[:2]) == size), None)


def classify_replies(predictor: Predictor, images: list[list[np.ndarray]]) -> list[dict[str, Any]]:
    """One reply per image (its candidates at the sizes the front knows of), all computed
    by `predictor` in one forward pass."""
    chosen = [fitting(predictor, candidates) for candidates in images]
    fits = [i for i, image in enumerate(chosen) if image is not None]
    replies: list[dict[str, Any]] = [stale_reply(predictor)] * len(images)
    if fits:
        probs = predictor.probabilities(np.stack([chosen[i] for i in fits]))
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
        "runtime": predictor.runtime.name,
        "precision": predictor.runtime.precision,
        "class_names": list(card.class_names),
        "image_size": list(card.image_size),
    }


def one_version(replies: list[dict[str, Any]]) -> bool:
    """Whether every reply was computed (none stale) by the same version."""
    return not any(r.get("stale") for r in replies) and len({r["version"] for r in replies}) == 1


class InputSizes:
    """The input sizes the model workers answered with lately, newest first: the sizes a
    front prepares each upload at. A size no answer named for `keep_s` is dropped (the
    newest is always kept)."""

    def __init__(self, keep_s: float = 60.0, clock=time.monotonic):
        self._seen: dict[tuple[int, int], float] = {}
        self._keep_s, self._clock = keep_s, clock

    def heard(self, size) -> None:
        self._seen[(int(size[0]), int(size[1]))] = self._clock()

    def current(self) -> list[tuple[int, int]]:
        newest_first = sorted(self._seen, key=self._seen.get, reverse=True)
        now = self._clock()
        keep = newest_first[:1] + [s for s in newest_first[1:] if now - self._seen[s] <= self._keep_s]
        self._seen = {s: self._seen[s] for s in keep[:2]}
        return keep[:2]
