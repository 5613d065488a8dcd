"""Temperature scaling: the fit, the figures, the saved model, the run, the gate's report."""

from __future__ import annotations

import math
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import quick_config
from training.calibrate import fit_temperature, logits_model, softmax, with_temperature
from training.evaluate import Evaluation, expected_calibration_error, negative_log_likelihood
from training.model import build_model

NO_AUGMENT = {"augment.enabled": False}


def _synthetic(temperature: float, n: int = 6000, classes: int = 5, seed: int = 0):
    """Logits and labels drawn from softmax(logits / temperature): the truth is known."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, (n, classes))
    probs = softmax(logits, temperature)
    labels = np.array([rng.choice(classes, p=row) for row in probs])
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_the_fit_recovers_a_known_temperature(true_t):
    logits, labels = _synthetic(true_t)
    fit = fit_temperature(logits, labels)
    assert fit.temperature == pytest.approx(true_t, rel=0.08)
    assert "fitted on 6000 validation images" in fit.reason


def test_a_split_without_errors_keeps_t_1_and_says_why():
    logits = np.array([[5.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    fit = fit_temperature(logits, np.array([0, 1, 2]))
    assert fit.temperature == 1.0
    assert "hold no error" in fit.reason and "T = 1" in fit.reason


def test_ece_and_nll_on_known_cases():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    # bin of 0.9: accuracy 0.5, gap 0.4; bin of 0.6: accuracy 1.0, gap 0.4; each half the images.
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)
    expected_nll = -(math.log(0.9) + math.log(0.1) + 2 * math.log(0.6)) / 4
    assert negative_log_likelihood(probs, labels) == pytest.approx(expected_nll)
    # Calibrated: half right at 0.5 confidence.
    assert expected_calibration_error(np.full((4, 2), 0.5), np.array([0, 1, 0, 1])) == pytest.approx(0.0)
    # A sure wrong answer costs -log(1e-7), as in Keras' loss.
    assert negative_log_likelihood(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(-math.log(1e-7))


def test_scaling_by_the_fitted_t_lowers_nll_and_ece_of_an_overconfident_model():
    logits, labels = _synthetic(3.0, seed=1)
    fit = fit_temperature(logits, labels)
    before, after = softmax(logits), softmax(logits, fit.temperature)
    assert negative_log_likelihood(after, labels) < negative_log_likelihood(before, labels)
    assert expected_calibration_error(after, labels) < 0.5 * expected_calibration_error(before, labels)
    assert (after.argmax(axis=1) == before.argmax(axis=1)).all()  # the ranking does not move


@pytest.mark.parametrize("backbone", ["simple_cnn", "vgg16"])
def test_a_trained_model_saved_with_t_loads_in_safe_mode_and_emits_softmax_of_logits_over_t(
    tmp_path, backbone
):
    config = quick_config(tmp_path, backbone=backbone, weights="none", **{"head.dense_units": [8]})
    model = build_model(config, num_classes=3)
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, (12, 32, 32, 3)).astype("float32")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(pixels, np.arange(12) % 3, epochs=2, batch_size=4, verbose=0)
    calibrated = with_temperature(model, 2.0)
    path = tmp_path / "calibrated.keras"
    calibrated.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    logits = np.asarray(logits_model(model).predict_on_batch(pixels), dtype="float64")
    np.testing.assert_allclose(loaded.predict_on_batch(pixels), softmax(logits, 2.0), atol=1e-5)
    np.testing.assert_allclose(model.predict_on_batch(pixels), softmax(logits), atol=1e-5)
    assert [layer.__class__.__name__ for layer in _head_end(loaded)] == ["Dense", "Rescaling", "Activation"]


def _head_end(model):
    layers = model.get_layer("head").layers if "head" in [la.name for la in model.layers] else model.layers
    return layers[-3:]


def test_logits_of_a_model_saved_before_the_temperature_layer(tmp_path):
    """An older model ends in Dense(softmax) `probs`: its logits are still found."""
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, activation="softmax", name="probs")(inputs)
    old = keras.Model(inputs, outputs)
    x = np.random.default_rng(2).normal(size=(5, 4)).astype("float32")
    logits = np.asarray(logits_model(old).predict_on_batch(x))
    np.testing.assert_allclose(softmax(logits), old.predict_on_batch(x), atol=1e-6)
    with pytest.raises(ValueError, match="no 'temperature' layer"):
        with_temperature(old, 2.0)


def test_a_run_fits_t_logs_the_figures_and_the_diagram_and_saves_calibrated_probabilities(
    shapes_dir_shared, tracking, tmp_path, capsys
):
    from training.calibrate import current_temperature
    from training.cli import print_result
    from training.train import train

    result = train(quick_config(shapes_dir_shared, epochs=2, **NO_AUGMENT), tracking)
    client = MlflowClient(tracking.resolved_tracking_uri())
    run = client.get_run(result.run_id)
    metrics = run.data.metrics
    t = metrics["calibration.temperature"]
    for split in ("val", "test"):
        for when in ("before", "after"):
            assert (
                f"calibration.{split}_ece_{when}" in metrics and f"calibration.{split}_nll_{when}" in metrics
            )
    assert metrics["test_ece"] == pytest.approx(metrics["calibration.test_ece_after"])
    assert metrics["test_nll"] == pytest.approx(metrics["calibration.test_nll_after"], rel=1e-4)
    reason = run.data.tags["calibration.reason"]
    assert ("fitted on" in reason) if t != 1.0 else ("hold no error" in reason)
    assert "plots/reliability_diagram.png" in [a.path for a in client.list_artifacts(result.run_id, "plots")]
    assert result.card.temperature == pytest.approx(t)
    assert current_temperature(result.model) == pytest.approx(t, rel=1e-6)
    print_result(result)
    shown = f"ECE / NLL (calibrated, T = {t:.3f}) │ {metrics['test_ece']:.4f} / {metrics['test_nll']:.4f}"
    assert shown in capsys.readouterr().out
    # The logged file loads in safe mode and emits softmax(logits / T).
    mlflow.set_tracking_uri(tracking.resolved_tracking_uri())
    folder = mlflow.artifacts.download_artifacts(result.model_uri, dst_path=str(tmp_path / "download"))
    (keras_file,) = list(Path(folder).rglob("*.keras"))
    loaded = keras.saving.load_model(keras_file, safe_mode=True)
    pixels = np.random.default_rng(3).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    raw = logits_model(with_temperature(loaded, 1.0))  # the head's logits, before 1/T
    logits = np.asarray(raw.predict_on_batch(pixels), dtype="float64")
    np.testing.assert_allclose(loaded.predict_on_batch(pixels), softmax(logits, t), atol=1e-5)


def _evaluation(probs, labels) -> Evaluation:
    return Evaluation(["cat", "dog"], np.array(labels), np.array(probs, dtype="float32"))


def test_the_gate_report_shows_ece_and_nll_for_candidate_and_champion(capsys):
    from registry.cli import print_decision
    from registry.settings import RegistrySettings
    from registry.steps import GateEvidence, Outcome, gate_verdict

    candidate = _evaluation([[0.7, 0.3], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6]], [0, 1, 0, 0])
    champion = _evaluation([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], [0, 1, 0, 1])
    settings = RegistrySettings()
    verdict = gate_verdict(GateEvidence("1", candidate, champion), settings)
    assert {"accuracy", "macro_f1", "ece", "nll"} <= set(verdict.candidate_metrics)
    assert verdict.champion_metrics["nll"] == pytest.approx(-math.log(1e-7) / 4, rel=1e-3)
    outcome = Outcome("2", "1", "macro_f1", verdict.passed, verdict.reason,
                      verdict.candidate_metrics, verdict.champion_metrics)  # fmt: skip
    print_decision(outcome, settings)
    rows = {line.split("│")[1].strip(): line for line in capsys.readouterr().out.splitlines() if "│" in line}
    names = [name for name in rows if name != "metric"]
    assert names[:4] == ["accuracy", "macro_f1", "ece (lower is better)", "nll (lower is better)"]
    assert f"{verdict.candidate_metrics['ece']:.4f}" in rows["ece (lower is better)"]
    assert f"{verdict.champion_metrics['nll']:.4f}" in rows["nll (lower is better)"]


def test_the_gate_refuses_to_gate_on_a_calibration_figure():
    from registry.gate import decide
    from registry.settings import RegistrySettings

    evaluation = _evaluation([[0.7, 0.3]], [0])
    with pytest.raises(ValueError, match="calibration figure"):
        decide(evaluation, None, RegistrySettings(gate_metric="nll"))


def test_the_version_card_shows_t_ece_and_nll():
    from imgcls.modelcard import ModelCard
    from registry.describe import VersionFacts, version_description
    from registry.register import version_tags

    card = ModelCard(class_names=["cat", "dog"], image_size=(32, 32), backbone="vgg16", temperature=1.7)
    tags = version_tags("r1", card, {"accuracy": 0.9, "macro_f1": 0.8, "ece": 0.05, "nll": 0.3}, None)
    assert tags["temperature"] == "1.7" and tags["metric.ece"] == "0.05" and tags["metric.nll"] == "0.3"
    facts = VersionFacts("3", metrics={"accuracy": 0.9, "ece": 0.05, "nll": 0.3}, temperature="1.7")
    text = version_description("clf", "champion", facts, None, [])
    assert "| test ECE / NLL (calibration) | 0.0500 / 0.3000 at temperature 1.7 |" in text


def _constant_split(model, copies: int = 8):
    """Batches of one image repeated, labelled with the model's own answer: no error."""
    image = np.random.default_rng(4).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    label = int(np.asarray(model.predict_on_batch(image)).argmax())
    images = np.repeat(image, copies, axis=0)
    return [(images[:4], np.full(4, label)), (images[4:], np.full(copies - 4, label))]


def test_a_validation_split_without_errors_falls_back_to_out_of_fold_predictions(tmp_path):
    from training.calibrate import calibrate, current_temperature

    model = build_model(quick_config(tmp_path), num_classes=5)
    split = _constant_split(model)
    held_out = _synthetic(2.0, n=3000)
    calibrated = calibrate(model, split, split, [f"c{i}" for i in range(5)], out_of_fold=lambda: held_out)
    assert calibrated.report.temperature == pytest.approx(2.0, rel=0.1)
    assert current_temperature(calibrated.model) == pytest.approx(calibrated.report.temperature)
    assert "holds no error" in calibrated.report.reason and "out-of-fold" in calibrated.report.reason
    # No frozen backbone to cache features of (simple_cnn): T stays 1, and the run says why.
    kept = calibrate(model, split, split, [f"c{i}" for i in range(5)], out_of_fold=lambda: None)
    assert kept.report.temperature == 1.0 and "hold no error" in kept.report.reason
    assert kept.model is model


def test_out_of_fold_logits_cover_train_and_validation_in_order(tmp_path):
    from training.calibrate import out_of_fold_logits
    from training.train import Splits

    config = quick_config(tmp_path, backbone="vgg16", weights="none", epochs=2, **{"head.dense_units": [8]})
    model = build_model(config, num_classes=3)
    rng = np.random.default_rng(5)
    train = [(rng.uniform(0, 255, (6, 32, 32, 3)).astype("float32"), np.arange(6) % 3) for _ in range(3)]
    val = [(rng.uniform(0, 255, (6, 32, 32, 3)).astype("float32"), (np.arange(6) + 1) % 3)]
    logits, labels = out_of_fold_logits(model, Splits(train, val, val), config, 3)
    assert logits.shape == (24, 3) and np.isfinite(logits).all()
    np.testing.assert_array_equal(labels, np.concatenate([y for _, y in train + val]))
    assert (
        out_of_fold_logits(build_model(quick_config(tmp_path), 3), Splits(train, val, val), config, 3) is None
    )
    # An ensemble's folds train each member's head and average their logits.
    other = config.model_copy(update={"head": config.head.model_copy(update={"pooling": "max"})})
    ensemble = build_model(config, 3, heads=[config.head, other.head])
    logits, labels = out_of_fold_logits(ensemble, Splits(train, val, val), config, 3, [config, other])
    assert logits.shape == (24, 3) and np.isfinite(logits).all()


@pytest.mark.parametrize("blocks", ["last", "last_two"])
def test_head_logits_on_cached_features_are_the_models_logits(tmp_path, blocks):
    """A run with cached features calibrates on them instead of running the backbone again."""
    from training.calibrate import head_logits
    from training.model import feature_extractor

    config = quick_config(tmp_path, backbone="vgg16", weights="none", backbone_blocks=blocks)
    model = build_model(config, num_classes=3)
    pixels = np.random.default_rng(6).uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    cached = np.asarray(feature_extractor(model).predict_on_batch(pixels))
    np.testing.assert_allclose(
        head_logits(model, cached), logits_model(model).predict_on_batch(pixels), rtol=1e-4, atol=1e-5
    )
