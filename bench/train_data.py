"""Folders the training benchmarks train on, made once from the archives in ../shared.

- `extract`: an archive unpacked as it is (train/ and test/).
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


def extract(archive: Path, dest: Path) -> Path:
    """Unpack a shared data archive once; returns the folder holding train/ and test/."""
    marker = dest / ".done"
    if not marker.exists():
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        marker.touch()
    return next(p.parent for p in dest.rglob("train") if p.is_dir())


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
    with tarfile.open(archive) as tar:
        chosen = _chosen(tar.getmembers(), per_class, classes)
    with tarfile.open(archive, "r|gz") as stream:  # in archive order: no seeking back in the gzip
        for member in stream:
            if member.name not in chosen:
                continue
            parts = Path(member.name).parts
            data, name = stream.extractfile(member).read(), parts[-1]
            if convert is not None:
                data, name = convert(data), Path(name).with_suffix(".jpg").name
            (dest / parts[-2]).mkdir(parents=True, exist_ok=True)
            (dest / parts[-2] / f"{parts[-3]}-{name}").write_bytes(data)
    marker.touch()
    return dest


def _chosen(members, per_class: int, classes: set[str] | None) -> set[str]:
    """The names of the first `per_class` files of each class (training files first)."""
    counts: dict[str, int] = {}
    chosen = set()
    for member in sorted((m for m in members if m.isfile()), key=lambda m: _order(m.name)):
        parts = Path(member.name).parts
        if len(parts) < 3 or (classes is not None and parts[-2] not in classes):
            continue
        if counts.get(parts[-2], 0) < per_class:
            counts[parts[-2]] = counts.get(parts[-2], 0) + 1
            chosen.add(member.name)
    return chosen


def _order(name: str) -> tuple[int, str]:
    """Training files first, then test files, each in name order (a fixed draw)."""
    return (0 if "/train/" in f"/{name}" else 1, name)


def _upscaled(data: bytes, size: int) -> bytes:
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()
