"""Progress of long work (imgcls/progress.py): log lines off a terminal, for the frozen-backbone
pass and the evaluation of a split; the backbone pass traced once (no retracing warning)."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest

from imgcls.progress import ENV_EVERY_S, Progress, final_line, status_line
from tests.conftest import quick_config
from training import features
from training.data import scan_dataset, split_view
from training.evaluate import evaluate_model
from training.model import build_model, feature_extractor
from training.train import load_splits


@pytest.fixture
def every_batch(monkeypatch):
    """A progress line at every step, so tiny work shows them (the default waits ~10 s)."""
    monkeypatch.setenv(ENV_EVERY_S, "0")


def _lines(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def test_lines_say_done_total_rate_and_time_left():
    assert (
        status_line("predict", 320, 2100, "files", 12.26)
        == "predict: 320/2100 files (15%), 26.1 files/s, 1:08 left"
    )
    assert status_line("eval", 5, None, "images", 2.0) == "eval: 5 images, 2.5 images/s"
    assert status_line("pass", 1, 10_000, "images", 1.0).endswith("2:46:39 left")
    assert (
        final_line("pass", 2100, 2100, "images", 80.44) == "pass: 2100/2100 images in 80.4 s (26.1 images/s)"
    )


def test_short_work_stays_silent_and_long_work_ends_with_a_total(caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    with Progress("quick", 3) as progress:
        progress.advance(3)
    assert _lines(caplog, "imgcls.progress") == []  # under 10 s: nothing, as before
    monkeypatch.setenv(ENV_EVERY_S, "0")
    with Progress("slow", 3, "files") as progress:
        progress.advance(2)
        progress.advance(1)
    lines = _lines(caplog, "imgcls.progress")
    assert len(lines) == 3  # one per step, then the total
    assert lines[0].startswith("slow: 2/3 files (67%), ") and lines[0].endswith(" left")
    assert lines[1].startswith("slow: 3/3 files (100%)") and lines[-1].startswith("slow: 3/3 files in ")


def test_backbone_pass_shows_progress_and_is_traced_once(shapes_dir_shared, tmp_path, caplog, every_batch):
    """Validation and four augmented passes of train, as a photo run makes them: lines to
    the whole count and a final one; TensorFlow's "triggered tf.function retracing" warning
    (each pass traced again, last batch too) is gone."""
    caplog.set_level(logging.INFO)
    config = quick_config(
        shapes_dir_shared, backbone="vgg16", weights="none", augment_passes=4, **{"augment.preset": "photo"}
    )
    scan = scan_dataset(config.data, val_fraction=config.val_fraction, test_fraction=config.test_fraction)
    n, val = len(scan.files["train"]), len(scan.files["val"])
    model = build_model(config, len(scan.class_names))
    with split_view(tmp_path) as view:
        splits = load_splits(scan, config, view)
        cache = features.compute_cache(model, feature_extractor(model), splits, config, n)
    assert cache.passes == 4
    total = val + 4 * n
    lines = _lines(caplog, "training.features")
    assert lines[0].startswith(f"vgg16 backbone pass: 8/{total} images")
    assert f"vgg16 backbone pass: {total}/{total} images (100%)" in " ".join(lines)
    assert any(line.startswith(f"vgg16 backbone pass: {total}/{total} images in ") for line in lines)
    tensorflow = [r.getMessage() for r in caplog.records if r.name in ("tensorflow", "absl")]
    assert not [m for m in tensorflow if "retracing" in m], tensorflow


def test_evaluation_shows_progress_to_the_split_size(shapes_dir_shared, caplog, every_batch):
    """The count comes from the files Keras read (a registry gate's test split) or `total`."""
    caplog.set_level(logging.INFO)
    dataset = keras.utils.image_dataset_from_directory(
        shapes_dir_shared, image_size=(32, 32), batch_size=16, shuffle=False, verbose=False
    )
    files = len(dataset.file_paths)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    evaluation = evaluate_model(model, dataset, ["circle", "square", "stripes"])
    assert len(evaluation.y_true) == files
    lines = _lines(caplog, "training.evaluate")
    assert lines[0].startswith(f"evaluation: 16/{files} images")
    assert lines[-1].startswith(f"evaluation: {files}/{files} images in ")
    caplog.clear()
    images = np.zeros((5, 32, 32, 3), "float32")
    tiny = [(images, np.zeros(5, "int64")), (images[:2], np.zeros(2, "int64"))]
    evaluate_model(model, tiny, ["a", "b", "c"], total=7)
    assert _lines(caplog, "training.evaluate")[-1].startswith("evaluation: 7/7 images in ")
