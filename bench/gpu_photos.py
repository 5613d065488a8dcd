"""Real photos as JPEGs of varied sizes around 500x375, as real uploads are (issue 11).

scikit-image ships a few real photos (`skimage.data`: chelsea, astronaut, coffee, ...);
where it is not installed, bench.photos' CIFAR-10 photos from ../shared (or its made-up
ones) stand in. Each is resized and re-encoded to many sizes, so the service's resize sees
many input shapes: a resize that compiles once per shape shows up in the figures.
"""

from __future__ import annotations

import io
from pathlib import Path

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

        from bench.photos import photo_jpegs

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
