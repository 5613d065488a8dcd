"""The demo dataset: scikit-learn's 1,797 real 8x8 handwritten digits as a folder tree.

No network: the digits ship inside scikit-learn. Each image is upscaled to PNG so the
folder looks like any user's class-per-folder dataset.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


def write_digits_dataset(dest: Path, size: int = 32) -> Path:
    """Write `dest/<digit>/<index>.png` (greyscale, `size` x `size`); returns dest.

    Idempotent: an existing complete tree is reused.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    dest = Path(dest)
    if len(list(dest.glob("*/*.png"))) == len(digits.images):
        return dest
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = dest / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        # sklearn digits are 0..16 ink levels; scale to 0..255 with a white background.
        grey = (255 - pixels * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(grey, "L").resize((size, size), Image.Resampling.BICUBIC)
        image.save(folder / f"{index:04d}.png")
    log.info("wrote %d demo images to %s", len(digits.images), dest)
    return dest
