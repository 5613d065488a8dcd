"""Real JPEG files for the serving benchmarks: CIFAR-10 photos from ../shared upscaled
to PHOTO_SIZE, or generated photo-like images where ../shared has none."""

from __future__ import annotations

import itertools
import tarfile
from pathlib import Path

# Larger than both model inputs, so the service's resize path (and the demo model's
# box-filter shrink) runs as it does on real uploads.
PHOTO_SIZE = (256, 256)


def photo_jpegs(shared: Path, count: int) -> tuple[list[bytes], str]:
    """`count` JPEG files at PHOTO_SIZE: CIFAR-10 photos if ../shared has them, else made."""
    archive = shared / "data/cifar10-small.tar.gz"
    if archive.is_file():
        return [_upscaled_jpeg(data) for data in _cifar_jpegs(archive, count)], f"{archive.name}, upscaled"
    return [_generated_jpeg(seed) for seed in range(count)], "generated (no ../shared data)"


def _cifar_jpegs(archive: Path, count: int) -> list[bytes]:
    """The first JPEG of each class in turn, until `count` (a mix of classes)."""
    by_class: dict[str, list[tarfile.TarInfo]] = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and member.name.endswith(".jpg") and len(parts) >= 3:
                by_class.setdefault(parts[-2], []).append(member)
        members = [m for group in itertools.zip_longest(*by_class.values()) for m in group if m]
        return [tar.extractfile(m).read() for m in members[:count]]


def _upscaled_jpeg(data: bytes) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    with Image.open(io.BytesIO(data)) as img:
        img.convert("RGB").resize(PHOTO_SIZE, Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


def _generated_jpeg(seed: int) -> bytes:
    """A smooth photo-like image: colour gradients, a few blobs, sensor-like noise."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = PHOTO_SIZE
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = rng.uniform(0, 255, 3) * (1 - yy[..., None]) + rng.uniform(0, 255, 3) * xx[..., None]
    for _ in range(4):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        img[mask] = rng.uniform(0, 255, 3)
    img = np.clip(img / 2 + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, "JPEG", quality=90)
    return out.getvalue()
