"""Folders the training benchmarks train on, made once from the archives in ../shared.

- `mnist_subset`: the first N training images of each digit (the issue's "MNIST, 500 per
  class"), one folder per class; the run carves validation and test from it.
- `photo_folder`: ../shared has no photo set, so CIFAR-10 photos upscaled to 256x256 JPEGs
  (bicubic, quality 90) stand in: N per class of the first few classes, one folder per
  class, trained at 224 px.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def mnist_subset(archive: Path, dest: Path, per_class: int) -> Path:
    """`dest/<digit>/*.png`: the first `per_class` training PNGs of each digit."""
    return _subset(archive, dest, per_class, classes=None, convert=None)


def photo_folder(archive: Path, dest: Path, classes: int, per_class: int, size: int = 256) -> Path:
    """`dest/<class>/*.jpg`: `per_class` CIFAR-10 photos (train, then test) of the first
    `classes` classes, upscaled to size x size."""
    with tarfile.open(archive) as tar:
        names = sorted({Path(m).parts[-2] for m in tar.getnames() if m.endswith(".jpg")})[:classes]
    return _subset(archive, dest, per_class, classes=set(names), convert=lambda data: _upscaled(data, size))


def _subset(archive: Path, dest: Path, per_class: int, classes: set[str] | None, convert) -> Path:
    marker = dest / ".done"
    if marker.exists():
        return dest
    counts: dict[str, int] = {}
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: _order(m.name))
        for member in members:
            parts = Path(member.name).parts
            label = parts[-2]
            if len(parts) < 3 or (classes is not None and label not in classes):
                continue
            if counts.get(label, 0) >= per_class:
                continue
            data = tar.extractfile(member).read()
            name = Path(member.name).name
            if convert is not None:
                data, name = convert(data), Path(name).with_suffix(".jpg").name
            (dest / label).mkdir(parents=True, exist_ok=True)
            (dest / label / f"{parts[-3]}-{name}").write_bytes(data)
            counts[label] = counts.get(label, 0) + 1
    marker.touch()
    return dest


def _order(name: str) -> tuple[int, str]:
    """Training files first, then test files, each in name order (a fixed draw)."""
    return (0 if "/train/" in f"/{name}" else 1, name)


def _upscaled(data: bytes, size: int) -> bytes:
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()
