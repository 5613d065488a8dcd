"""Models: the course CNN's size, frozen backbones, in-graph preprocessing, safe loading."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.conftest import SHARED, quick_config
from training.model import (
    build_backbone,
    build_model,
    caffe_preprocessing,
    count_params,
    feature_extractor,
    unfreeze_top,
)

VGG16_NOTOP_PARAMS = 14_714_688
RESNET50_NOTOP_PARAMS = 23_587_712  # 53,120 of them are BatchNorm moving statistics


def test_simple_cnn_is_the_course_network(tmp_path):
    model = build_model(quick_config(tmp_path, image_size=28), num_classes=10)
    # The course's 81,200 is for greyscale input; RGB adds 2 x 9 x 16 first-layer weights.
    assert count_params(model).total == 81_200 + 2 * 9 * 16
    assert count_params(model).frozen == 0


@pytest.mark.parametrize(
    ("backbone", "frozen"), [("vgg16", VGG16_NOTOP_PARAMS), ("resnet50", RESNET50_NOTOP_PARAMS)]
)
def test_backbone_is_frozen_and_only_the_head_trains(tmp_path, backbone, frozen):
    config = quick_config(tmp_path, backbone=backbone, weights="none", **{"head.dense_units": [16]})
    model = build_model(config, num_classes=3)
    counts = count_params(model)
    head = sum(int(np.prod(w.shape)) for w in model.get_layer("head").trainable_weights)
    assert counts.trainable == head
    assert counts.frozen == frozen + 12  # + the fixed preprocessing convolution
    assert model.get_layer("backbone").trainable is False


def test_preprocessing_layer_equals_keras_preprocess_input():
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype("float32")
    expected = keras.applications.vgg16.preprocess_input(pixels.copy())
    np.testing.assert_allclose(np.asarray(caffe_preprocessing()(pixels)), expected, atol=1e-4)
    np.testing.assert_allclose(
        keras.applications.resnet50.preprocess_input(pixels.copy()), expected, atol=1e-4
    )


def test_saved_model_loads_in_safe_mode_and_predicts_the_same(tmp_path):
    config = quick_config(tmp_path, backbone="vgg16", weights="none", **{"head.dense_units": [8]})
    model = build_model(config, num_classes=3)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict_on_batch(pixels), model.predict_on_batch(pixels), atol=1e-6)
    assert "augmentation" in [layer.name for layer in loaded.layers]


def test_an_ensemble_head_averages_its_members_logits_and_loads_in_safe_mode(tmp_path):
    from training.calibrate import logits_model, softmax, with_temperature
    from training.config import HeadConfig
    from training.model import ensemble_members, head_summary

    config = quick_config(tmp_path, backbone="vgg16", weights="none", **{"augment.enabled": False})
    heads = [HeadConfig(dense_units=[8]), HeadConfig(pooling="max", dense_units=[], dropout=0.0)]
    model = build_model(config, num_classes=3, heads=heads)
    members = ensemble_members(model)
    assert [m.name for m in members] == ["member_0", "member_1"]
    assert members[1].layers[-1].name == "logits"  # members end at their logits
    pixels = np.random.default_rng(4).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    features = feature_extractor(model).predict_on_batch(pixels)
    mean_logits = np.mean([np.asarray(m(features), dtype="float64") for m in members], axis=0)
    np.testing.assert_allclose(model.predict_on_batch(pixels), softmax(mean_logits), atol=1e-5)
    np.testing.assert_allclose(logits_model(model).predict_on_batch(pixels), mean_logits, atol=1e-4)
    calibrated = with_temperature(model, 2.0)  # one temperature, after the average
    path = tmp_path / "ensemble.keras"
    calibrated.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict_on_batch(pixels), softmax(mean_logits, 2.0), atol=1e-5)
    assert len(ensemble_members(loaded)) == 2
    assert ensemble_members(build_model(config, num_classes=3)) == []  # a single head
    assert head_summary(model, "last_two") == "2 heads averaged on the last two blocks"
    assert head_summary(model, "last", cross_fitted=True) == "2 cross-fitted heads averaged on the last block"
    assert head_summary(build_model(config, num_classes=3), "last") == "one dense head on the last block"
    assert head_summary(build_model(quick_config(tmp_path), num_classes=3), "last") is None  # simple_cnn


@pytest.mark.parametrize(
    ("size", "asked", "blocks"),
    [(96, "auto", "last_two"), (127, "auto", "last_two"), (128, "auto", "last"), (224, "auto", "last"),
     (224, "last_two", "last_two"), (96, "last", "last")],
)  # fmt: skip
def test_the_head_reads_the_last_two_blocks_on_small_inputs(tmp_path, size, asked, blocks):
    from training.model import choose_blocks

    config = quick_config(tmp_path, backbone="vgg16", weights="none", image_size=size, backbone_blocks=asked)
    choice = choose_blocks(config)
    assert choice.blocks == blocks
    assert ("set by the user" in choice.reason) == (asked != "auto")
    assert choose_blocks(quick_config(tmp_path)).blocks == "last"  # simple_cnn


@pytest.mark.parametrize(("backbone", "channels"), [("vgg16", (512, 512)), ("resnet50", (1024, 2048))])
def test_two_block_features_are_pooled_normalised_and_load_in_safe_mode(tmp_path, backbone, channels):
    config = quick_config(tmp_path, backbone=backbone, weights="none", backbone_blocks="last_two")
    model = build_model(config, num_classes=3)
    extractor = feature_extractor(model)
    pixels = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    features = np.asarray(extractor.predict_on_batch(pixels))
    assert features.shape == (2, 1, 1, sum(channels))
    first, second = features[:, 0, 0, : channels[0]], features[:, 0, 0, channels[0] :]
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), np.sqrt(channels[0]), rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(second, axis=1), np.sqrt(channels[1]), rtol=1e-4)
    assert model.get_layer("backbone").trainable is False
    plain = build_model(config.model_copy(update={"backbone_blocks": "last"}), num_classes=3)
    assert unfreeze_top(model, 4) == unfreeze_top(plain, 4) > 0  # the backbone's own top layers
    path = tmp_path / "two_blocks.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict_on_batch(pixels), model.predict_on_batch(pixels), atol=1e-6)


def test_local_weights_file_is_loaded(tmp_path):
    source = build_backbone("vgg16", None, (32, 32))
    path = tmp_path / "vgg16_notop.weights.h5"
    source.save_weights(path)
    loaded = build_backbone("vgg16", str(path), (32, 32))
    for a, b in zip(source.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    two = build_backbone("vgg16", str(path), (32, 32), blocks="last_two")  # the same weights, shared
    for a, b in zip(source.get_weights(), two.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not (SHARED / "weights/vgg16_imagenet_notop.h5").exists(), reason="../shared not present")
def test_real_imagenet_vgg16_file_loads():
    backbone = build_backbone("vgg16", str(SHARED / "weights/vgg16_imagenet_notop.h5"), (32, 32))
    first_kernel = backbone.get_layer("block1_conv1").get_weights()[0]
    assert first_kernel.shape == (3, 3, 3, 64) and abs(float(first_kernel.std()) - 0.0) > 1e-3


def test_fine_tuning_opens_top_layers_but_not_batchnorm(tmp_path):
    config = quick_config(tmp_path, backbone="resnet50", weights="none", **{"head.dense_units": [8]})
    model = build_model(config, num_classes=3)
    before = count_params(model).trainable
    opened = unfreeze_top(model, 10)
    backbone = model.get_layer("backbone")
    assert opened > 0 and count_params(model).trainable > before
    assert not any(
        layer.trainable for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)
    )
