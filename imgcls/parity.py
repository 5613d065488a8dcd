"""A version's parity set: up to 200 of its held-out images as uint8 model inputs, stored
with its model (`parity.npz` beside the `.keras` file), against which every compiled build
is checked on the machine that serves it (service/compiled.py)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

PARITY_FILE = "parity.npz"
PARITY_IMAGES = 200


def gather(batches: Iterable, limit: int = PARITY_IMAGES) -> np.ndarray:
    """Up to `limit` images from (images, labels) batches, in order, as uint8 (N, H, W, 3)."""
    kept, count = [], 0
    for batch in batches:
        images = np.asarray(batch[0] if isinstance(batch, tuple | list) else batch)[: limit - count]
        kept.append(np.clip(np.rint(images), 0, 255).astype(np.uint8))
        count += len(images)
        if count >= limit:
            break
    return np.concatenate(kept) if kept else np.zeros((0, 1, 1, 3), np.uint8)


def save(images: np.ndarray, path: Path) -> Path:
    """Write the parity set (compressed); its path."""
    np.savez_compressed(path, images=np.asarray(images, np.uint8))
    return path


def load(path: Path | None) -> np.ndarray | None:
    """The parity images at `path`, or None when there is none (or it cannot be read)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        with np.load(path) as data:
            return np.asarray(data["images"], np.uint8)
    except (OSError, ValueError, KeyError):
        return None


def find(folder: Path) -> Path | None:
    """The parity file inside a downloaded model folder, if it has one."""
    return next(iter(sorted(Path(folder).rglob(PARITY_FILE))), None)
