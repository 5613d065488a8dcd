"""Real JPEG files for the serving benchmarks: CIFAR-10 photos from ../shared upscaled
to PHOTO_SIZE, or generated photo-like images where ../shared has none (`photo_jpegs`);
for the GPU benchmark, real photos at varied sizes around 500x375, as real uploads are
(`varied_jpegs`, issue 11): scikit-image's few bundled photos where it is installed, else
those, each resized and re-encoded to many sizes, so a resize that compiles once per
shape shows up in the figures."""

from __future__ import annotations

import io
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
    from PIL import Image

    out = io.BytesIO()
    with Image.open(io.BytesIO(data)) as img:
        img.convert("RGB").resize(PHOTO_SIZE, Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


def _generated_jpeg(seed: int) -> bytes:
    """A smooth photo-like image: colour gradients, a few blobs, sensor-like noise."""
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


# Photos bundled with scikit-image itself (others are downloaded on first use: no network there).
SKIMAGE_PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")
# Sizes spread around 500x375 (landscape and portrait), in steps that JPEG would not round.
BASE = (500, 375)
SCALES = (0.7, 0.8, 0.9, 1.0, 1.1, 1.25)


def source_photos(shared: Path) -> tuple[list, str]:
    """RGB uint8 arrays of real photos, and where they came from."""
    import numpy as np

    try:
        from skimage import data
    except ImportError:
        from PIL import Image

        jpegs, source = photo_jpegs(shared, 8)
        return [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs], source
    photos = []
    for name in SKIMAGE_PHOTOS:
        try:
            image = np.asarray(getattr(data, name)())
        except Exception:  # noqa: BLE001 - a photo that needs a download is skipped
            continue
        if image.ndim == 3 and image.shape[2] >= 3:
            photos.append(image[..., :3].astype(np.uint8))
    return photos, f"scikit-image data ({len(photos)} photos)"


def varied_jpegs(shared: Path, count: int, seed: int = 0) -> tuple[list[bytes], list[tuple[int, int]], str]:
    """`count` JPEGs (quality 90) of the source photos at varied sizes around 500x375;
    their (width, height) sizes; where the photos came from."""
    import numpy as np
    from PIL import Image

    photos, source = source_photos(shared)
    rng = np.random.default_rng(seed)
    jpegs, sizes = [], []
    for i in range(count):
        scale = SCALES[i % len(SCALES)] * rng.uniform(0.97, 1.03)
        width, height = (round(BASE[0] * scale), round(BASE[1] * scale))
        if i % 4 == 3:  # some portrait uploads
            width, height = height, width
        out = io.BytesIO()
        Image.fromarray(photos[i % len(photos)]).resize((width, height), Image.Resampling.BILINEAR).save(
            out, "JPEG", quality=90
        )
        jpegs.append(out.getvalue())
        sizes.append((width, height))
    return jpegs, sizes, f"{source}, {len(set(sizes))} sizes from {min(sizes)} to {max(sizes)}"
