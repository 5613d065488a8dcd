"""From a class-per-folder tree to validated train/validation/test datasets.

`scan_dataset` checks every file before training starts (bad files are left out and
listed; an unusable dataset stops with a message naming the problem and the path).
The split is fixed in a manifest. Each split is then written once, through the service's
own `imgcls.images.model_input`, as lossless PNGs at the model's input size, and Keras'
`image_dataset_from_directory` reads those: the loader never meets a bad file mid-epoch,
and training sees exactly the pixels the service will compute for the same file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from imgcls.images import ImageDecodeError, accepted_extensions, decode_image, model_input, refused_format
from training.augment import ImageStats

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


class DatasetError(ValueError):
    """The folder cannot be trained on; the message names the problem and the path."""


@dataclass
class DatasetScan:
    """The outcome of checking a dataset folder: usable files per split, and what was left out."""

    root: Path
    class_names: list[str]
    layout: str  # "folders" (train/val/test sub-folders) or "single" (split by seed)
    files: dict[str, list[tuple[str, int]]]  # split -> [(path relative to root, label)]
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    warnings: list[str] = field(default_factory=list)
    image_stats: ImageStats | None = None  # None when rebuilt from a manifest
    exif_oriented: int = 0  # images an EXIF orientation turns upright

    @property
    def class_counts(self) -> dict[str, int]:
        """Usable images per class, all splits together."""
        counts = Counter(label for items in self.files.values() for _, label in items)
        return {name: counts[i] for i, name in enumerate(self.class_names)}

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the file list and sizes, taken once: same data, same fingerprint."""
        digest = hashlib.sha256("\n".join(self.class_names).encode())
        for split in SPLITS:
            for rel, label in sorted(self.files[split]):
                size = (self.root / rel).stat().st_size
                digest.update(f"\n{split}/{label}/{rel}:{size}".encode())
        return digest.hexdigest()[:16]

    def manifest(self) -> dict:
        """A JSON-able record of the split, enough to rebuild any split later."""
        return {
            "root": str(self.root),
            "class_names": self.class_names,
            "layout": self.layout,
            "fingerprint": self.fingerprint,
            "files": {s: [list(item) for item in self.files[s]] for s in SPLITS},
        }

    def report(self) -> dict:
        """What the scan found, for the terminal and as a run artifact."""
        return {
            "root": str(self.root),
            "layout": self.layout,
            "class_counts": self.class_counts,
            "split_sizes": {s: len(self.files[s]) for s in SPLITS},
            "bad_files": [{"path": p, "reason": r} for p, r in self.bad_files],
            "warnings": self.warnings,
            "image_stats": None if self.image_stats is None else vars(self.image_stats),
            "exif_oriented": self.exif_oriented,
        }

    def smallest_class(self, split: str) -> int:
        """Images of the smallest class in one split."""
        counts = Counter(label for _, label in self.files[split])
        return min(counts[i] for i in range(len(self.class_names)))


def scan_dataset(
    root: Path,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.15,
    seed: int = 42,
    imbalance_ratio_warning: float = 10.0,
    val_min_per_class: int = 30,
) -> DatasetScan:
    """Check a class-per-folder tree and fix its train/val/test split.

    Layouts: `root/<class>/*` (split by a seeded, stratified draw) or
    `root/{train,val,test}/<class>/*` (a missing val or test is carved from train).
    A carved validation split takes, per class, `val_fraction` of it or
    `val_min_per_class` images, whichever is more, but never over MAX_VAL_SHARE of it.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    split_dirs = _split_dirs(root)
    layout = "folders" if split_dirs else "single"
    class_names = _class_names(split_dirs.get("train", root))
    per_split, bad, looks = _check_files(root, split_dirs or {"train": root}, class_names)
    _require_usable(root, class_names, per_split)
    given_val = bool(per_split["val"])
    files = _assign_splits(per_split, val_fraction, test_fraction, seed, val_min_per_class)
    scan = DatasetScan(root, class_names, layout, files, bad, image_stats=_image_stats(looks))
    scan.exif_oriented = sum(look[2] for look in looks)
    scan.warnings = _warnings(scan, imbalance_ratio_warning, val_min_per_class if given_val else 0)
    return scan


def _split_dirs(root: Path) -> dict[str, Path]:
    found = {
        _SPLIT_ALIASES[p.name.lower()]: p
        for p in root.iterdir()
        if p.is_dir() and p.name.lower() in _SPLIT_ALIASES
    }
    if found and "train" not in found:
        raise DatasetError(f"{root} has {sorted(found)} folders but no train/ folder")
    return found


def _class_names(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DatasetError(f"no class folders in {folder}: expected one sub-folder per class")
    if len(names) < 2:
        raise DatasetError(f"only one class ({names[0]}) in {folder}: need at least two")
    return names


def _check_files(root: Path, split_dirs: dict[str, Path], class_names: list[str]):
    """Decode every candidate file once; returns usable files, bad files, and how each
    usable image looks: (short side, greyscale, EXIF-oriented)."""
    candidates, bad = [], []
    extensions = accepted_extensions()  # the service's allow-list; anything else is left out
    for split, folder in split_dirs.items():
        for label, name in enumerate(class_names):
            class_dir = folder / name
            if not class_dir.is_dir():
                continue
            for path in sorted(p for p in class_dir.rglob("*") if p.is_file()):
                rel = str(path.relative_to(root))
                if path.suffix.lower() not in extensions:
                    bad.append((rel, _not_an_image_file(path)))
                else:
                    candidates.append((split, rel, label))
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        verdicts = list(pool.map(lambda c: _check_image(root / c[1]), candidates))
    per_split: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    looks = []
    for (split, rel, label), (reason, look) in zip(candidates, verdicts, strict=True):
        if reason:
            bad.append((rel, reason))
        else:
            per_split[split].append((rel, label))
            looks.append(look)
    return per_split, bad, looks


def _not_an_image_file(path: Path) -> str:
    """Why a file with another ending is left out: a refused image format, or not an image."""
    with path.open("rb") as f:
        refused = refused_format(f.read(16))
    return refused or f"not an image file ({path.suffix or 'no extension'})"


def _check_image(path: Path) -> tuple[str | None, tuple[int, bool, bool] | None]:
    """(reason it is unusable or None, (short side, greyscale, EXIF-oriented))."""
    try:
        data = path.read_bytes()
        pixels = decode_image(data)
    except (ImageDecodeError, OSError) as exc:
        return str(exc), None
    return None, (min(pixels.shape[:2]), _is_greyscale(pixels), _has_exif_rotation(data))


def _is_greyscale(pixels: np.ndarray) -> bool:
    """Whether the three channels are equal (sampled on a grid of at most ~256 x 256)."""
    step = max(1, max(pixels.shape[:2]) // 256)
    grid = pixels[::step, ::step]
    return bool((grid[..., 0] == grid[..., 1]).all() and (grid[..., 1] == grid[..., 2]).all())


def _image_stats(looks: list[tuple[int, bool, bool]]) -> ImageStats:
    sides = sorted(look[0] for look in looks)
    return ImageStats(len(looks), sum(look[1] for look in looks), sides[len(sides) // 2] if sides else 0)


def _has_exif_rotation(data: bytes) -> bool:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.getexif().get(0x0112, 1) not in (1, None)
    except Exception:  # noqa: BLE001 - EXIF is advisory only
        return False


def _require_usable(root: Path, class_names: list[str], per_split) -> None:
    counts = Counter(label for items in per_split.values() for _, label in items)
    empty = [name for i, name in enumerate(class_names) if counts[i] == 0]
    if empty:
        raise DatasetError(f"class folder(s) with no usable images under {root}: {', '.join(empty)}")
    few = [name for i, name in enumerate(class_names) if counts[i] < 3]
    if few:
        raise DatasetError(
            f"class(es) with fewer than 3 usable images under {root} (one each is needed "
            f"for train, validation and test): {', '.join(few)}"
        )


# A carved validation split never takes more than this share of a class.
MAX_VAL_SHARE = 0.3


def _assign_splits(per_split, val_fraction, test_fraction, seed, val_min_per_class=0):
    """Carve missing val/test splits from train, stratified per class, seeded."""
    files = {s: list(per_split[s]) for s in SPLITS}
    need = [s for s in ("test", "val") if not files[s]]
    if not need:
        return files
    rng = random.Random(seed)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for item in files["train"]:
        by_class.setdefault(item[1], []).append(item)
    files["train"] = []
    for items in by_class.values():
        rng.shuffle(items)
        n = len(items)
        for split in need:
            take = _carved(n, split, val_fraction, test_fraction, val_min_per_class) if n > len(need) else 0
            files[split] += items[:take]
            items = items[take:]
        files["train"] += items
    return {s: sorted(v) for s, v in files.items()}


def _carved(n: int, split: str, val_fraction: float, test_fraction: float, val_min: int) -> int:
    """Images of a class of `n` carved for `split`: its fraction, and for validation at
    least `val_min` of them up to MAX_VAL_SHARE of the class."""
    if split == "test":
        return max(1, round(n * test_fraction))
    return max(1, round(n * val_fraction), min(val_min, int(n * MAX_VAL_SHARE)))


def _warnings(scan: DatasetScan, ratio_limit: float, val_min_per_class: int) -> list[str]:
    out = []
    counts = scan.class_counts
    ratio = max(counts.values()) / max(1, min(counts.values()))
    if ratio > ratio_limit:
        out.append(
            f"heavy class imbalance: largest/smallest class = {ratio:.1f} "
            f"({counts}); consider class_weight: balanced"
        )
    for split in SPLITS:
        missing = [n for i, n in enumerate(scan.class_names) if all(lb != i for _, lb in scan.files[split])]
        if missing:
            out.append(f"{split} split has no images of: {', '.join(missing)}")
    small_val = _small_classes(scan, "val", val_min_per_class)
    if small_val:
        out.append(
            f"val/ has fewer than {val_min_per_class} images of {small_val}: early stopping and "
            "the learning-rate schedule steer on them; add images there, or remove val/ to "
            "have it carved from train/"
        )
    if scan.bad_files:
        out.append(f"{len(scan.bad_files)} file(s) left out (see data_report.json)")
    return out


def _small_classes(scan: DatasetScan, split: str, minimum: int) -> str:
    counts = Counter(label for _, label in scan.files[split])
    small = [f"{n} ({counts[i]})" for i, n in enumerate(scan.class_names) if 0 < counts[i] < minimum]
    return ", ".join(small)


def scan_from_manifest(manifest: dict) -> DatasetScan:
    """Rebuild a scan from a logged manifest; raises DatasetError if files have gone."""
    root = Path(manifest["root"])
    files = {s: [(rel, int(label)) for rel, label in manifest["files"][s]] for s in SPLITS}
    missing = [rel for items in files.values() for rel, _ in items if not (root / rel).is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} file(s) of the logged split are missing under {root}, e.g. {missing[0]}"
        )
    return DatasetScan(root, list(manifest["class_names"]), manifest["layout"], files)


def split_view(home: Path) -> contextlib.AbstractContextManager[Path]:
    """The folder one run writes its split images to, removed after the run: under
    `home/tmp` rather than TMPDIR, once the stale folders that killed runs left there are
    swept (imgcls/scratch.py)."""
    from imgcls.scratch import scratch_dir, sweep_stale

    sweep_stale(home)
    return scratch_dir(home, "imgcls-view-")


def write_view(scan: DatasetScan, split: str, dest: Path, image_size: tuple[int, int]) -> Path:
    """Write `dest/<class>/<n>.png`: each usable file of a split as the model will see it.

    Uses `imgcls.images.model_input` (what the service runs on an upload), stored as
    lossless PNGs at `image_size`; Keras then reads them without changing a pixel.
    """
    for name in scan.class_names:
        (dest / name).mkdir(parents=True, exist_ok=True)
    jobs = [
        (scan.root / rel, dest / scan.class_names[label] / f"{index:07d}.png")
        for index, (rel, label) in enumerate(scan.files[split])
    ]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        list(pool.map(lambda job: _write_model_input(*job, image_size), jobs))
    return dest


def _write_model_input(source: Path, target: Path, image_size: tuple[int, int]) -> None:
    from PIL import Image

    pixels = model_input(source.read_bytes(), image_size)
    Image.fromarray(pixels).save(target, compress_level=1)  # lossless; fast beats small here


def load_split(
    scan: DatasetScan,
    split: str,
    view_dir: Path,
    image_size: tuple[int, int],
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 42,
    written: bool = False,
):
    """A batched tf.data.Dataset of (raw RGB float32 images, int labels) for one split.

    Order (unshuffled): class by class, files in manifest order. `written`: the split's
    view is on disk already (an earlier call wrote it), so it is read, not written again.
    """
    import keras

    folder = Path(view_dir) / split
    if not written:
        write_view(scan, split, folder, image_size)
    return keras.utils.image_dataset_from_directory(
        folder,
        labels="inferred",
        label_mode="int",
        class_names=scan.class_names,
        color_mode="rgb",
        batch_size=batch_size,
        image_size=image_size,  # already this size: Keras' resize leaves the pixels as they are
        shuffle=shuffle,
        seed=seed,
        interpolation="bilinear",
        verbose=False,
    )


def save_manifest(scan: DatasetScan, path: Path) -> Path:
    """Write the split manifest as JSON; returns the path."""
    path.write_text(json.dumps(scan.manifest(), indent=1))
    return path
