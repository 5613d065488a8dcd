"""Augmentation presets and the rule that picks one, and the validation split's size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import quick_config
from training import augment
from training.augment import ImageStats, choose_preset
from training.config import load_config
from training.data import scan_dataset
from training.model import build_augmentation

COLOUR_PHOTOS = ImageStats(images=400, greyscale=3, median_short_side=480)
DIGITS = ImageStats(images=400, greyscale=400, median_short_side=28)


@pytest.mark.parametrize(
    ("overrides", "stats", "per_class", "preset"),
    [
        ({"backbone": "vgg16"}, COLOUR_PHOTOS, 120, "photo"),
        ({"backbone": "resnet50"}, ImageStats(400, 0, 32), 120, "photo"),  # CIFAR-like: still photos
        ({"backbone": "vgg16"}, DIGITS, 120, "orientation_bound"),
        ({"backbone": "simple_cnn"}, COLOUR_PHOTOS, 120, "orientation_bound"),
        ({"backbone": "vgg16"}, COLOUR_PHOTOS, 1500, "none"),  # large: cached features
        ({"backbone": "vgg16", "augment.rotation": 0.1}, COLOUR_PHOTOS, 1500, "photo"),  # asked for
        (
            {"backbone": "vgg16", "augment.preset": "orientation_bound"},
            COLOUR_PHOTOS,
            120,
            "orientation_bound",
        ),
        ({"backbone": "simple_cnn", "augment.preset": "photo"}, DIGITS, 120, "photo"),
        ({"backbone": "vgg16", "augment.enabled": False}, COLOUR_PHOTOS, 120, "none"),
    ],
    ids=[
        "photos",
        "small-colour",
        "greyscale",
        "simple_cnn",
        "large",
        "large-asked",
        "user",
        "user-cnn",
        "off",
    ],
)
def test_the_rule_picks_a_preset_and_says_why(tmp_path, overrides, stats, per_class, preset):
    config = load_config(None, data=tmp_path, **overrides)
    choice = choose_preset(config, stats, per_class)
    assert choice.preset == preset and choice.reason
    resolved = augment.resolve(config, choice)
    assert resolved.augment.preset == preset and resolved.augment.active == (preset != "none")
    assert resolved.flat_params()["augment.preset"] == preset


def test_presets_give_their_layers_and_explicit_fields_win(tmp_path):
    config = load_config(None, data=tmp_path, **{"augment.preset": "orientation_bound", "augment.zoom": 0.2})
    settings = augment.layer_settings(config.augment)
    assert settings["flip"] == "none" and settings["zoom"] == 0.2 and settings["rotation"] == 0.03
    names = [layer.__class__.__name__ for layer in build_augmentation(config.augment, 0).layers]
    assert "RandomFlip" not in names and "RandomRotation" in names
    photo = [
        layer.__class__.__name__
        for layer in build_augmentation(load_config(None, data=tmp_path).augment, 0).layers
    ]
    assert photo[0] == "RandomFlip"


def test_the_scan_sees_greyscale_and_size(tmp_path, shapes_dir):
    stats = scan_dataset(shapes_dir).image_stats
    assert stats.images == 38 and stats.greyscale == 1 and stats.median_short_side == 32
    grey = tmp_path / "digits"
    rng = np.random.default_rng(0)
    for digit in ("0", "1"):
        (grey / digit).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(grey / digit / f"{i}.png")
    stats = scan_dataset(grey).image_stats
    assert stats.greyscale_share == 1.0
    choice = choose_preset(load_config(None, data=grey), stats, 3)
    assert choice.preset == "orientation_bound" and "greyscale" in choice.reason


def _one_colour_dataset(root, per_class: int):
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i % 256, 10, 10)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize(("per_class", "val"), [(13, 3), (60, 18), (120, 30), (400, 80)])
def test_validation_takes_max_of_the_fraction_and_30_per_class_up_to_30_percent(tmp_path, per_class, val):
    scan = scan_dataset(_one_colour_dataset(tmp_path / "d", per_class), val_fraction=0.2)
    counts = [sum(1 for _, label in scan.files["val"] if label == c) for c in (0, 1)]
    assert counts == [val, val]


def test_a_small_given_validation_folder_is_reported(tmp_path):
    root = tmp_path / "split"
    _one_colour_dataset(root / "train", 40)
    _one_colour_dataset(root / "val", 5)
    scan = scan_dataset(root)
    assert any("val/ has fewer than 30 images of a (5), b (5)" in w for w in scan.warnings)


def test_training_logs_the_preset_and_its_reason(shapes_dir_shared, tracking):
    from mlflow import MlflowClient

    from training.train import train

    result = train(quick_config(shapes_dir_shared, epochs=1), tracking)
    run = MlflowClient(tracking.resolved_tracking_uri()).get_run(result.run_id)
    assert run.data.params["augment.preset"] == "orientation_bound"
    assert run.data.params["augment.flip"] == "none"
    assert "simple_cnn" in run.data.tags["augment.reason"]
    assert "30 images" in run.data.tags["validation.rule"]
