"""Cross-fitted ensemble heads (`ensemble_fit: folds`, training/folds.py) on tiny data."""

from __future__ import annotations

import re
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import quick_config
from training import ensemble, search
from training.config import ConfigError
from training.features import FeatureCache
from training.folds import FitChoice, Folds, OutOfFold, choose
from training.model import build_ensemble_head, ensemble_members
from training.tracking import configure_mlflow
from training.train import compile_model, train

TINY_VGG = {"backbone": "vgg16", "weights": "none", "epochs": 3}


def _cache(train: int = 40, val: int = 20, passes: int = 2, classes: int = 3, seed: int = 0) -> FeatureCache:
    """Feature maps whose class shows in their mean; feature 0 of every map holds the row's
    identity / 1000 (train rows 0.., validation rows 1000..), the same in every pass."""
    rng = np.random.default_rng(seed)

    def maps(count, first_id):
        y = np.arange(count) % classes
        x = rng.normal(0, 1, (count, 1, 1, 8)).astype("float32")
        x[np.arange(count), :, :, 1 + y] += 3.0
        x[:, 0, 0, 0] = (first_id + np.arange(count)) / 1000
        return x, y

    train_x, train_y = maps(train, 0)
    passes_x = [train_x + np.float32(0.01 * k) * (np.arange(8) > 0) for k in range(passes)]  # ids untouched
    val_x, val_y = maps(val, 1000)
    return FeatureCache(passes_x, [train_y] * passes, val_x, val_y, seconds=0.0, aligned=True)


def _ids(x: np.ndarray) -> set[int]:
    return set(_ids_list(x))


def test_folds_are_stratified_and_each_view_holds_its_fold_out():
    cache = _cache()
    folds = Folds.stratified(cache, 4, seed=42)
    labels = np.concatenate([cache.train_y[0], cache.val_y])
    every = np.concatenate([folds.of_train, folds.of_val])
    assert set(every) == {0, 1, 2, 3}
    for label in range(3):  # each class spread over the folds within one image
        counts = np.bincount(every[labels == label], minlength=4)
        assert counts.max() - counts.min() <= 1
    everyone = _ids(cache.train_x[0]) | _ids(cache.val_x)
    held_out_so_far: set[int] = set()
    for i in range(4):
        view = folds.cache(cache, i)
        held_out = _ids(view.val_x)
        assert held_out.isdisjoint(held_out_so_far)  # every image is held out once
        held_out_so_far |= held_out
        assert view.passes == cache.passes and view.aligned
        for x, y in zip(view.train_x, view.train_y, strict=True):
            assert _ids(x) == everyone - held_out  # validation rows join every pass
            assert len(x) == len(y)
        # Labels travel with their rows.
        by_id = dict(zip(_ids_list(cache.train_x[0]) + _ids_list(cache.val_x), labels, strict=True))
        assert [by_id[i] for i in _ids_list(view.val_x)] == list(view.val_y)
        assert [by_id[i] for i in _ids_list(view.train_x[1])] == list(view.train_y[1])
    assert held_out_so_far == everyone
    again = Folds.stratified(cache, 4, seed=42)  # seeded
    assert np.array_equal(again.of_train, folds.of_train) and np.array_equal(again.of_val, folds.of_val)


def _ids_list(x: np.ndarray) -> list[int]:
    return [int(round(v * 1000)) for v in x[:, 0, 0, 0]]


def test_out_of_fold_puts_each_heads_logits_back_in_place():
    cache = _cache(train=10, val=5, passes=1)
    folds = Folds.stratified(cache, 3, seed=0)
    oof = OutOfFold(folds, cache, classes=3)
    for i in range(3):
        view = folds.cache(cache, i)
        ids = np.array(_ids_list(view.val_x), dtype="float64")[:, None]
        oof.add(i, np.repeat(ids, 3, axis=1))  # logits = the ids
        assert oof.complete() == (i == 2)
    assert list(oof.validation()[0][:, 0]) == [1000 + r for r in range(5)]
    logits, labels = oof.labelled()
    assert list(logits[:, 0]) == list(range(10)) + [1000 + r for r in range(5)]
    assert list(labels) == list(cache.train_y[0]) + list(cache.val_y)


@pytest.mark.parametrize(
    ("heads", "overrides", "mode", "words"),
    [
        (5, {}, "folds", "each head trains on 800 images and stops early on the other 200"),
        (3, {}, "train", "no more than the training split's 700"),  # 2/3 of 1,000 < 700
        (1, {}, "train", "one head"),
        (5, {"fine_tune.unfreeze_layers": 4}, "train", "fine-tuning stops on the validation split"),
        (5, {"ensemble_fit": "train"}, "train", "ensemble_fit: train"),
        (3, {"ensemble_fit": "folds"}, "folds", "ensemble_fit: folds"),
    ],
)
def test_the_auto_rule_cross_fits_when_each_head_sees_more_than_the_training_split(
    tmp_path, heads, overrides, mode, words
):
    config = quick_config(tmp_path, **TINY_VGG, **overrides)
    sizes = FeatureCache([np.zeros((700, 1, 1, 2))], [np.zeros(700, int)], np.zeros((300, 1, 1, 2)),
                         np.zeros(300, int), 0.0, aligned=True)  # fmt: skip
    choice = choose(config, heads, sizes)
    assert choice.mode == mode and words in choice.reason


def test_too_few_images_for_the_folds_train_on_the_training_split(tmp_path):
    cache = _cache(train=6, val=3, passes=1)
    choice = choose(quick_config(tmp_path, **TINY_VGG), 5, cache)
    assert choice.mode == "train" and "9 labelled images are too few for 5 folds" in choice.reason
    with pytest.raises(ValueError, match="ensemble_fit: folds: 9 labelled images are too few for 5 folds"):
        choose(quick_config(tmp_path, **TINY_VGG, ensemble_fit="folds"), 5, cache)


def test_passes_in_different_orders_are_never_cross_fitted(tmp_path):
    cache = _cache()
    cache.aligned = False
    choice = choose(quick_config(tmp_path, **TINY_VGG), 4, cache)
    assert choice.mode == "train" and "not in one order" in choice.reason
    with pytest.raises(
        ValueError, match="ensemble_fit: folds: the cached training passes are not in one order"
    ):
        choose(quick_config(tmp_path, **TINY_VGG, ensemble_fit="folds"), 4, cache)


def test_folds_and_fine_tuning_are_refused_together(tmp_path):
    with pytest.raises(ConfigError, match="ensemble_fit: folds trains the heads on the validation images"):
        quick_config(tmp_path, **TINY_VGG, ensemble_fit="folds", **{"fine_tune.unfreeze_layers": 2})


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"backbone": "simple_cnn"}, "simple_cnn has no frozen backbone"),
        ({"cache_features": False}, "cached backbone features (cache_features: true)"),
        ({"augment_passes": 0}, "live augmentation (augment_passes: 0)"),
        ({"distribute": "mirrored"}, "under --distribute"),
        ({"search_ensemble": 1}, "one head (search_ensemble 1 or search 1)"),
        ({"search": 1}, "one head (search_ensemble 1 or search 1)"),
        ({"head.dense_units": [32, 16]}, "one dense layer at most (head.dense_units)"),
    ],
)
def test_an_explicit_folds_that_could_not_cross_fit_is_refused_naming_the_field(tmp_path, overrides, words):
    """Where a run would quietly train one head on the training split, `folds` says why."""
    options = TINY_VGG | {"ensemble_fit": "folds"} | overrides
    if options["backbone"] == "simple_cnn":
        options.pop("weights")
    with pytest.raises(ConfigError, match=r"ensemble_fit: folds: .*" + re.escape(words)):
        quick_config(tmp_path, **options)
    quick_config(tmp_path, **(options | {"ensemble_fit": "auto"}))  # auto trains one head there


def test_a_cache_too_large_to_copy_per_fold_trains_on_the_training_split(tmp_path, monkeypatch):
    from training import folds

    cache = _cache(train=40, val=20, passes=2)
    monkeypatch.setattr(folds, "FOLD_COPY_BUDGET_BYTES", folds.cache_bytes(cache) - 1)
    choice = choose(quick_config(tmp_path, **TINY_VGG), 4, cache)
    assert choice.mode == "train" and "each fold's copy of the cached features would take" in choice.reason
    with pytest.raises(ValueError, match="ensemble_fit: folds: each fold's copy"):
        choose(quick_config(tmp_path, **TINY_VGG, ensemble_fit="folds"), 4, cache)
    monkeypatch.setattr(folds, "FOLD_COPY_BUDGET_BYTES", folds.cache_bytes(cache))
    assert choose(quick_config(tmp_path, **TINY_VGG), 4, cache).mode == "folds"


def test_cross_fitted_heads_are_scored_on_the_fold_they_never_trained_on(tmp_path, tracking):
    configure_mlflow(tracking)
    cache = _cache(train=45, val=24, passes=2)
    config = quick_config(tmp_path, search=4, **(TINY_VGG | {"epochs": 8}))
    with mlflow.start_run():
        outcome = search.search_head(cache, config, classes=3, class_weight=None)
    chosen = ensemble.members(outcome, config)
    inputs = keras.Input(cache.feature_shape)
    model = keras.Model(inputs, build_ensemble_head(ensemble.heads(chosen), cache.feature_shape, 3)(inputs))
    fitted = ensemble.fit_members(model, cache, chosen, None, compile_model, [], FitChoice("folds", "test"))
    oof = fitted.out_of_fold
    assert oof is not None and oof.complete() and len(fitted.history["val_loss"]) >= 1
    folds = oof.folds
    members = ensemble_members(model)
    for row in range(len(cache.val_y)):  # each validation image: the logits of the head that held it out
        member = members[folds.of_val[row]]
        expected = np.asarray(member(cache.val_x[row : row + 1], training=False))[0]
        np.testing.assert_allclose(oof.validation()[0][row], expected, rtol=1e-4, atol=1e-4)
    assert oof.fold_accuracy(0) > 0.8  # separable features: the held-out folds are learned
    # Head 0 is the best trial's and was trained by Keras (its history is the run's curves).
    assert chosen[0][0] is outcome.best


def test_a_search_run_cross_fits_its_heads_by_default(shapes_dir_shared, tracking):
    config = quick_config(shapes_dir_shared, search=4, **TINY_VGG, **{"augment.enabled": False})
    result = train(config, tracking)
    client = MlflowClient(tracking.resolved_tracking_uri())
    run = client.get_run(result.run_id)
    assert run.data.tags["ensemble.fit"].startswith("folds: auto: 4 folds of train + validation")
    assert len(ensemble_members(result.model)) == 4 == run.data.metrics["ensemble_members"]
    assert result.card.head == "4 cross-fitted heads averaged on the last two blocks"
    assert 0 <= run.data.metrics["ensemble_out_of_fold_val_accuracy"] <= 1
    assert "ensemble_val_accuracy" not in run.data.metrics  # the heads trained on most of validation
    assert {f"ensemble_member_{i}_held_out_accuracy" for i in range(4)} <= set(run.data.metrics)
    reason = run.data.tags["calibration.reason"]  # fitted on held-out logits, or T = 1 without errors
    assert "(each from the head that held it out)" in reason or "cross-fitted heads" in reason
    table = Path(client.download_artifacts(result.run_id, "search/ensemble.md")).read_text()
    assert "held-out fold accuracy" in table and "How the heads trained: folds" in table
    assert result.metrics["accuracy"] >= 0


def test_balanced_weights_follow_the_labels_a_head_trains_on():
    from sklearn.utils.class_weight import compute_class_weight

    from training.folds import balanced_weights

    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    assert balanced_weights(labels, 3) == pytest.approx(dict(enumerate(expected)))


def test_the_default_command_cross_fits_copies_of_its_head(shapes_dir_shared, tracking):
    config = quick_config(shapes_dir_shared, **TINY_VGG, **{"augment.enabled": False})  # no search
    result = train(config, tracking)
    client = MlflowClient(tracking.resolved_tracking_uri())
    run = client.get_run(result.run_id)
    assert run.data.tags["ensemble.fit"].startswith("folds: auto: 5 folds of train + validation")
    members = ensemble_members(result.model)
    assert len(members) == 5 == run.data.metrics["ensemble_members"]
    assert all([w.shape[-1] for w in m.trainable_weights] == [256, 256, 3, 3] for m in members)  # the head
    assert result.card.head == "5 cross-fitted heads averaged on the last two blocks"
    table = Path(client.download_artifacts(result.run_id, "ensemble.md")).read_text()
    assert "How the heads trained: folds" in table
    assert "search_trials" not in run.data.metrics


@pytest.mark.parametrize(
    "overrides",
    [
        {"search_ensemble": 1},  # one head asked for
        {"head.dense_units": [32, 16]},  # two dense layers: fast_head trains one at most
        {"ensemble_fit": "train"},  # copies on one training split would be alike
    ],
)
def test_one_head_without_a_search_when_copies_would_not_differ(shapes_dir_shared, tracking, overrides):
    config = quick_config(shapes_dir_shared, **TINY_VGG, **{"augment.enabled": False}, **overrides)
    result = train(config, tracking)
    assert ensemble_members(result.model) == []
    assert result.card.head == "one dense head on the last two blocks"
