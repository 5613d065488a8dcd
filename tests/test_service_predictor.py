"""The Predictor, Grad-CAM and the model stores, in process with real Keras/MLflow/BentoML."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service import gradcam
from service.predictor import Predictor, top_k
from service.settings import ServiceSettings
from service.sources import load_predictor
from service.store import load_from_bento_store, load_from_mlflow, save_to_bento_store
from tests.service_fixtures import (
    CLASSES,
    SIZE,
    build_tiny_model,
    colour_image,
    encode,
    log_keras_model,
    tiny_card,
)


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_model()


def test_predict_bytes_gives_the_expected_labels(tiny_model):
    predictor = Predictor(tiny_model, tiny_card(), "3")
    blobs = [encode(colour_image(c), "PNG") for c in CLASSES]
    results = predictor.predict_bytes(blobs, k=2)
    assert [r[0]["label"] for r in results] == CLASSES
    assert all(len(r) == 2 and r[0]["probability"] > 0.9 for r in results)


def test_top_k_orders_by_probability():
    assert [p["label"] for p in top_k(np.array([0.2, 0.5, 0.3]), CLASSES, 3)] == [
        "green",
        "blue",
        "red",
    ]


def test_bento_store_round_trip(tmp_path, tiny_model):
    tiny_model.save(tmp_path / "m.keras")
    tag = save_to_bento_store(tmp_path / "m.keras", tiny_card(), "roundtrip", 4, {"stage": "t"})
    model, card, version = load_from_bento_store("roundtrip")
    assert tag.startswith("roundtrip:") and version == "4" and card == tiny_card()
    x = np.random.default_rng(0).uniform(0, 255, (2, *SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x, verbose=0), tiny_model.predict(x, verbose=0))


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A real SQLite MLflow store in tmp_path, set as the current one for this test only."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # An earlier test's `open_store` may have set another registry (also in the environment).
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)  # also unsets MLFLOW_TRACKING_URI
    mlflow.set_registry_uri(None)


def test_mlflow_champion_is_loaded_with_its_card_and_version(tmp_path, monkeypatch, mlflow_uri, tiny_model):
    import mlflow

    artifacts = (tmp_path / "artifacts").as_uri()  # not ./mlruns in the working tree
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("svc", artifacts))
    card = tiny_card()
    for _ in range(2):  # two versions: the alias, not "latest", must decide
        with mlflow.start_run():
            info = log_keras_model(tiny_model, card)
        mlflow.register_model(info.model_uri, "clf")
    mlflow.MlflowClient().set_registered_model_alias("clf", "champion", "1")

    model, loaded_card, version = load_from_mlflow("models:/clf@champion")
    assert version == "1" and loaded_card == card
    monkeypatch.setenv("IMGCLS_TRACKING_URI", mlflow_uri)
    predictor = load_predictor(ServiceSettings(source="mlflow", model_name="clf"))
    assert predictor.version == "1" and predictor.name == "clf"
    assert predictor.predict_bytes([encode(colour_image("blue"), "PNG")])[0][0]["label"] == "blue"


@pytest.mark.parametrize("variable", ["IMGCLS_REGISTRY_MODEL_NAME", "IMGCLS_REGISTERED_MODEL_NAME"])
def test_registry_and_service_agree_on_the_model_name(variable, monkeypatch, tmp_path, tiny_model):
    """One variable names the model everywhere: registered name, BentoML name, served name;
    from the BentoML store the entry labelled champion is served, not the newest."""
    from registry.settings import RegistrySettings

    monkeypatch.setenv(variable, "cats")
    registry = RegistrySettings()
    assert registry.model_name == registry.bento_model_name == ServiceSettings().model_name == "cats"
    tiny_model.save(tmp_path / "m.keras")
    labels = {"registered_model": "cats", "alias": "champion"}
    save_to_bento_store(tmp_path / "m.keras", tiny_card(), registry.bento_model_name, 7, labels)
    save_to_bento_store(tmp_path / "m.keras", tiny_card(), registry.bento_model_name, 8)  # newer
    predictor = load_predictor(ServiceSettings())
    assert (predictor.name, predictor.version) == ("cats", "7")
    monkeypatch.setenv("IMGCLS_SERVE_MODEL_NAME", "dogs")  # the service's own option wins
    assert ServiceSettings().model_name == "dogs" and RegistrySettings().model_name == "cats"


def test_gradcam_points_at_the_coloured_patch(tiny_model):
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[4:24, 4:24, 0] = 255  # a red patch, top-left
    predictor = Predictor(tiny_model, tiny_card(), "1")
    x = predictor.preprocess(encode(pixels, "PNG"))
    heat = gradcam.gradcam_heatmap(gradcam.split_at_last_conv(tiny_model), x, 0)
    assert heat.shape == SIZE
    top_left, rest = heat[:12, :12].mean(), heat[16:, 16:].mean()
    assert top_left > 0.5 > rest


def test_gradcam_reaches_into_a_nested_keras_applications_backbone():
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.Sequential([keras.layers.RandomFlip("horizontal")], name="augment")(inputs)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(x)
    backbone = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    x = backbone(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))

    _assert_cut_at_block5_conv3(model, atol=1e-6)
    png = Predictor(model, tiny_card(), "1").explain(encode(colour_image("red"), "PNG"))
    assert Image.open(io.BytesIO(png)).size == (40, 48)


def test_gradcam_cuts_a_backbone_that_reads_its_last_two_blocks(tmp_path):
    """backbone_blocks: last_two: block4's branch skips block5_conv3 on its way to the head."""
    from tests.conftest import quick_config
    from training.model import build_model

    config = quick_config(tmp_path, backbone="vgg16", weights="none", backbone_blocks="last_two")
    split, image = _assert_cut_at_block5_conv3(build_model(config, num_classes=3), atol=1e-5)
    assert gradcam.gradcam_heatmap(split, image[0], 1).shape == (2, 2)


def _assert_cut_at_block5_conv3(model, atol: float):
    """The model cut at VGG16's last conv and put back together gives its own answer."""
    import keras

    split = gradcam.split_at_last_conv(model)
    assert split.layer_name == "block5_conv3"
    image = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    features, context = split.to_conv(image)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(split.from_conv(features, context)),
        model.predict(image, verbose=0),
        atol=atol,
    )
    return split, image
