"""The run config rejects bad values with a message naming the field and the file."""

from __future__ import annotations

import pytest

from training.config import ConfigError, load_config


def test_defaults_resolve_backbone_input_size(tmp_path):
    config = load_config(None, data=tmp_path)
    assert config.backbone == "vgg16"
    assert config.input_size == (224, 224)
    assert load_config(None, data=tmp_path, backbone="simple_cnn").input_size == (28, 28)


def test_command_line_overrides_the_file(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("backbone: resnet50\nepochs: 7\naugment: {zoom: 0.2}\n")
    config = load_config(file, data=tmp_path, epochs=3)
    assert (config.backbone, config.epochs, config.augment.zoom) == ("resnet50", 3, 0.2)
    assert config.flat_params()["augment.zoom"] == "0.2"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"learning_rate": -1}, "learning_rate"),
        ({"backbone": "alexnet"}, "backbone"),
        ({"weights": "/no/such/file.h5"}, "weights"),
        ({"augment.zoom": 1.5}, "augment.zoom"),
        ({"head.dense_units": [0]}, "head.dense_units"),
        ({"image_size": 4}, "image_size"),
        ({"image_size": 28, "backbone": "vgg16"}, "image_size"),
    ],
)
def test_bad_values_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, data=tmp_path, **overrides)
    assert field in str(info.value)


def test_unknown_field_in_file_is_named_with_the_file(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("epochz: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(file, data=tmp_path)
    assert "epochz" in str(info.value) and str(file) in str(info.value)


def test_broken_yaml_and_missing_file(tmp_path):
    broken = tmp_path / "bad.yaml"
    broken.write_text("epochs: [3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken, data=tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", data=tmp_path)


def test_simple_cnn_cannot_fine_tune(tmp_path):
    with pytest.raises(ConfigError, match="unfreeze_layers"):
        load_config(None, data=tmp_path, backbone="simple_cnn", **{"fine_tune.unfreeze_layers": 4})
