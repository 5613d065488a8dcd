"""The folder scan: bad files left out and listed, unusable datasets stopped with the path."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from training.data import DatasetError, load_split, scan_dataset, scan_from_manifest


def test_scan_splits_every_class_into_train_val_test(shapes_dir):
    scan = scan_dataset(shapes_dir, seed=1)
    assert scan.class_names == ["circle", "square", "stripes"]
    assert scan.layout == "single"
    assert scan.class_counts == {"circle": 13, "square": 13, "stripes": 12}
    for split in ("train", "val", "test"):
        assert {label for _, label in scan.files[split]} == {0, 1, 2}
    every = [rel for items in scan.files.values() for rel, _ in items]
    assert len(every) == len(set(every)) == 38


def test_split_and_fingerprint_are_repeatable(shapes_dir):
    first, again = scan_dataset(shapes_dir, seed=3), scan_dataset(shapes_dir, seed=3)
    assert first.files == again.files and first.fingerprint == again.fingerprint
    (shapes_dir / "circle" / "circle_1.png").write_bytes(b"\x89PNG" + b"0" * 10)
    assert scan_dataset(shapes_dir, seed=3).fingerprint != first.fingerprint


def test_bad_files_are_left_out_and_listed(shapes_dir):
    (shapes_dir / "circle" / "notes.txt").write_text("not an image")
    (shapes_dir / "square" / "fake.jpg").write_bytes(b"this is no jpeg")
    good = (shapes_dir / "stripes" / "stripes_1.png").read_bytes()
    (shapes_dir / "stripes" / "truncated.png").write_bytes(good[: len(good) // 2])
    scan = scan_dataset(shapes_dir)
    bad = dict(scan.bad_files)
    assert set(bad) == {"circle/notes.txt", "square/fake.jpg", "stripes/truncated.png"}
    assert "not an image" in bad["square/fake.jpg"]
    assert "truncated" in bad["stripes/truncated.png"] or "corrupt" in bad["stripes/truncated.png"]
    listed = {rel for items in scan.files.values() for rel, _ in items}
    assert not listed & set(bad)
    assert any("left out" in w for w in scan.warnings)


def test_unusable_datasets_stop_with_the_path(tmp_path, shapes_dir):
    with pytest.raises(DatasetError, match="not found"):
        scan_dataset(tmp_path / "nowhere")
    (shapes_dir / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        scan_dataset(shapes_dir)
    only = tmp_path / "one"
    (only / "cats").mkdir(parents=True)
    with pytest.raises(DatasetError, match="only one class"):
        scan_dataset(only)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    with pytest.raises(DatasetError, match=str(flat)):
        scan_dataset(flat)


def test_heavy_imbalance_is_reported(shapes_dir):
    for path in sorted((shapes_dir / "stripes").iterdir())[3:]:
        path.unlink()
    scan = scan_dataset(shapes_dir, imbalance_ratio_warning=2.0)
    assert any("imbalance" in w for w in scan.warnings)


def test_train_val_test_folders_are_used_as_given(tmp_path, shapes_dir):
    root = tmp_path / "split"
    for split in ("train", "val", "test"):
        for kind in ("circle", "square"):
            (root / split / kind).mkdir(parents=True)
    for i, path in enumerate(sorted((shapes_dir / "circle").glob("*.png"))[:6]):
        split = ("train", "train", "train", "train", "val", "test")[i]
        path_sq = sorted((shapes_dir / "square").glob("*.png"))[i]
        (root / split / "circle" / path.name).write_bytes(path.read_bytes())
        (root / split / "square" / path_sq.name).write_bytes(path_sq.read_bytes())
    scan = scan_dataset(root)
    assert scan.layout == "folders"
    assert [len(scan.files[s]) for s in ("train", "val", "test")] == [8, 2, 2]
    assert all(rel.startswith("test/") for rel, _ in scan.files["test"])


def test_greyscale_and_rgba_load_as_rgb_at_the_model_size(tmp_path, shapes_dir):
    scan = scan_dataset(shapes_dir)
    scan.files["test"] = [("circle/grey.png", 0), ("square/rgba.png", 1)]
    images, labels = next(iter(load_split(scan, "test", tmp_path / "view", (40, 40), 8)))
    assert images.shape == (2, 40, 40, 3) and list(np.asarray(labels)) == [0, 1]
    grey = np.asarray(images[0])
    assert np.allclose(grey[..., 0], grey[..., 1]) and np.allclose(grey[..., 1], grey[..., 2])


def test_manifest_rebuilds_the_split_and_notices_missing_files(shapes_dir):
    scan = scan_dataset(shapes_dir)
    again = scan_from_manifest(scan.manifest())
    assert again.files == scan.files and again.class_names == scan.class_names
    manifest = scan.manifest()
    (shapes_dir / scan.files["test"][0][0]).unlink()
    with pytest.raises(DatasetError, match="missing"):
        scan_from_manifest(manifest)


def _odd_images(folder):
    """Files whose decoding differs between naive loaders: the service's decoder is the rule."""
    rng = np.random.default_rng(5)
    photo = rng.integers(0, 256, (150, 210, 3), dtype=np.uint8)
    Image.fromarray(photo).save(folder / "photo.jpg", quality=90)  # JPEG: IDCT choice matters
    Image.fromarray(photo).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (40, 30), dtype=np.uint16)).save(folder / "deep.png")
    Image.fromarray(photo).save(folder / "really_tiff.jpg", format="TIFF")  # wrong extension
    Image.fromarray(rng.integers(0, 256, (700, 500, 3), dtype=np.uint8)).save(folder / "big.png")
    Image.fromarray(photo).save(folder / "photo.webp")


def test_training_sees_exactly_the_pixels_the_service_computes(tmp_path, shapes_dir):
    from imgcls.images import load_image

    _odd_images(shapes_dir / "circle")
    scan = scan_dataset(shapes_dir)
    names = ["photo.jpg", "cmyk.jpg", "deep.png", "really_tiff.jpg", "big.png", "photo.webp"]
    assert not scan.bad_files
    scan.files["test"] = [(f"circle/{name}", 0) for name in names]
    images, _ = next(iter(load_split(scan, "test", tmp_path / "view", (32, 32), 16)))
    for name, loaded in zip(names, np.asarray(images), strict=True):
        served = load_image((shapes_dir / "circle" / name).read_bytes(), (32, 32))
        np.testing.assert_array_equal(loaded, served, err_msg=name)


def test_refused_formats_are_left_out_with_the_format_named(shapes_dir):
    Image.new("RGB", (16, 16), "red").save(shapes_dir / "circle" / "icon.ico", format="ICO")
    Image.new("RGB", (16, 16), "red").save(shapes_dir / "square" / "texture.png", format="DDS")
    bad = dict(scan_dataset(shapes_dir).bad_files)
    assert bad["circle/icon.ico"].startswith("image format ICO is not accepted (accepted: JPEG, PNG")
    assert bad["square/texture.png"].startswith("image format DDS is not accepted")
