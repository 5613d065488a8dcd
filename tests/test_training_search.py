"""`--search N` and `--augment-passes K` on tiny data: real Keras, a real MLflow SQLite store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from imgcls.cli import build_parser
from imgcls.images import load_image
from tests.conftest import quick_config, run_artifacts
from training import features, search
from training.cli import config_from_args
from training.config import ConfigError
from training.data import scan_dataset, split_view
from training.evaluate import negative_log_likelihood
from training.fast_head import HeadParams, Schedule, fit_trial, pool
from training.model import build_model, ensemble_members, feature_extractor
from training.tracking import configure_mlflow
from training.train import load_splits, train

TINY_VGG = {"backbone": "vgg16", "weights": "none", "epochs": 3}


def _children(client: MlflowClient, run) -> list:
    return client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )


def test_search_runs_nested_trials_picks_the_best_on_validation_and_trains_it(shapes_dir_shared, tracking):
    # Heads on the training split (cross-fitted ones: tests/test_training_folds.py).
    config = quick_config(
        shapes_dir_shared, search=4, ensemble_fit="train", **TINY_VGG, **{"augment.enabled": False}
    )
    result = train(config, tracking)
    client = MlflowClient(tracking.resolved_tracking_uri())
    run = client.get_run(result.run_id)
    trials = _children(client, run)
    assert len(trials) == 4 and {t.info.status for t in trials} == {"FINISHED"}
    assert {"pooling", "units", "dropout", "learning_rate", "weight_decay", "label_smoothing"} <= set(
        trials[0].data.params
    )
    scores = {int(t.data.params["trial"]): t.data.metrics["val_accuracy"] for t in trials}
    best = int(run.data.metrics["search_best_trial"])
    assert scores[best] == max(scores.values()) == run.data.metrics["search_best_val_accuracy"]
    chosen = next(t for t in trials if int(t.data.params["trial"]) == best).data.params
    assert run.data.params["head.pooling"] == chosen["pooling"]  # the run's model is the best trial's
    assert float(run.data.params["learning_rate"]) == pytest.approx(float(chosen["learning_rate"]))
    low, high = (run.data.metrics[f"search_best_minus_second_ci_{k}"] for k in ("low", "high"))
    assert low <= run.data.metrics["search_best_minus_second"] <= high
    assert {"search/trials.csv", "search/trials.md", "plots/search.png"} <= run_artifacts(
        client, result.run_id
    )
    table = client.download_artifacts(result.run_id, "search/trials.csv")
    assert len(Path(table).read_text().strip().splitlines()) == 1 + 4
    assert result.metrics["accuracy"] >= 0  # the chosen head was trained and evaluated
    # The default ensemble (5) keeps all 4 trials, best first, each trained with its own config.
    members = ensemble_members(result.model)
    assert len(members) == 4 == run.data.metrics["ensemble_members"]
    assert result.card.head == "4 heads averaged on the last two blocks"  # 32 px: auto reads two
    ranked = sorted(trials, key=lambda t: (-t.data.metrics["val_accuracy"], t.data.metrics["val_loss"]))
    table = Path(client.download_artifacts(result.run_id, "search/ensemble.md")).read_text().splitlines()
    rows = [row for row in table if row.startswith("| ")][1:]
    assert [row.split("|")[2].strip() for row in rows] == [t.data.params["trial"] for t in ranked]
    assert table[-1].startswith("How the heads trained: train")
    assert int(ranked[0].data.params["trial"]) == best
    for member, trial in zip(members, ranked, strict=True):
        units = int(trial.data.params["units"])
        assert [w.shape[-1] for w in member.trainable_weights] == ([units, units] if units else []) + [3, 3]
    assert 0 <= run.data.metrics["ensemble_val_accuracy"] <= 1
    # The saved model is the one the cached features came from (its backbone kept after the search).
    val = result.scan.files["val"]
    pixels = np.stack([load_image((result.scan.root / f).read_bytes(), config.input_size) for f, _ in val])
    labels = np.array([label for _, label in val])
    nll = negative_log_likelihood(result.model.predict(pixels, verbose=0), labels)
    assert nll == pytest.approx(run.data.metrics["calibration.val_nll_after"], rel=1e-3)
    for i, trial in enumerate(ranked[1:], start=1):  # the trials' own heads, as the search scored them
        assert run.data.metrics[f"ensemble_member_{i}_val_accuracy"] == pytest.approx(
            trial.data.metrics["val_accuracy"], abs=1.01 / len(result.scan.files["val"])
        )


@pytest.mark.parametrize(("trials", "ensemble"), [(2, 1), (1, 5)])
def test_one_head_when_the_ensemble_or_the_search_has_one(shapes_dir_shared, tracking, trials, ensemble):
    config = quick_config(
        shapes_dir_shared, search=trials, search_ensemble=ensemble, **TINY_VGG, **{"augment.enabled": False}
    )
    result = train(config, tracking)
    assert ensemble_members(result.model) == []
    assert (
        "ensemble_members"
        not in MlflowClient(tracking.resolved_tracking_uri()).get_run(result.run_id).data.metrics
    )


def _synthetic_cache(seed: int = 0, classes: int = 3, n: int = 60) -> features.FeatureCache:
    """Feature maps whose class shows in their mean: a head can learn them."""
    rng = np.random.default_rng(seed)

    def maps(count):
        y = np.arange(count) % classes
        x = rng.normal(0, 1, (count, 2, 2, 16)).astype("float32")
        x[np.arange(count), :, :, y] += 2.0
        return np.maximum(x, 0), y

    (tx, ty), (vx, vy) = maps(n), maps(n // 2)
    return features.FeatureCache([tx], [ty], vx, vy, seconds=1.0)


def test_search_is_deterministic_with_the_seed(tmp_path, tracking):
    configure_mlflow(tracking)
    config = quick_config(tmp_path, search=5, **TINY_VGG)
    tables = []
    for _ in range(2):
        with mlflow.start_run():
            outcome = search.search_head(_synthetic_cache(), config, classes=3, class_weight=None)
        tables.append([{k: v for k, v in t.row().items() if k != "seconds"} for t in outcome.trials])
    assert tables[0] == tables[1] and len(tables[0]) == 5
    assert tables[0][0]["units"] == 256 and tables[0][0]["pooling"] == "avg"  # trial 0: the configured head


def test_trial_head_learns_separable_features():
    cache = _synthetic_cache()
    train = [(pool(cache.train_x[0], "avg"), cache.train_y[0])]
    val = (pool(cache.val_x, "avg"), cache.val_y)
    params = HeadParams("avg", 32, 0.1, 1e-2, 1e-3, 0.1)
    fit = fit_trial(train, val, 3, params, Schedule(30, 8, 5, 2), None, seed=0)
    assert fit.val_accuracy >= 0.9
    assert fit.val_loss < np.log(3)  # better than a uniform guess


def test_augmented_passes_cache_k_times_the_training_set(shapes_dir_shared, tmp_path):
    config = quick_config(shapes_dir_shared, augment_passes=3, **TINY_VGG, **{"augment.preset": "photo"})
    scan = scan_dataset(config.data, val_fraction=config.val_fraction, test_fraction=config.test_fraction)
    n = len(scan.files["train"])
    model = build_model(config, len(scan.class_names))
    with split_view(tmp_path) as view:
        splits = load_splits(scan, config, view)
        cache = features.compute_cache(model, feature_extractor(model), splits, config, n)
    assert cache.passes == 3 and [len(x) for x in cache.train_x] == [n, n, n]
    assert sum(len(y) for y in cache.train_y) == 3 * n and len(cache.val_x) == len(scan.files["val"])
    # Each pass is its own random augmentation (in its own order): the per-image features
    # differ as a set, not only in order.
    first, second = (np.sort(x.reshape(n, -1).sum(axis=1)) for x in cache.train_x[:2])
    assert not np.allclose(first, second, rtol=1e-3)


def test_augmented_run_trains_on_cached_passes_by_default(shapes_dir_shared, tracking):
    config = quick_config(shapes_dir_shared, **TINY_VGG, **{"augment.preset": "photo"})
    result = train(config, tracking)
    run = MlflowClient(tracking.resolved_tracking_uri()).get_run(result.run_id)
    passes = features.auto_passes({split: len(files) for split, files in result.scan.files.items()})
    assert run.data.params["augment_passes"] == str(passes)
    assert run.data.tags["augment.passes"].startswith(f"{passes} augmented copies")
    assert len(result.history["val_loss"]) == len(result.history["loss"]) >= 1


@pytest.mark.parametrize(
    ("sizes", "passes"),
    [
        ({"train": 700, "val": 300, "test": 200}, 1),  # the CIFAR-10 subset
        ({"train": 500, "val": 100, "test": 2000}, 3),  # a large given test/ folder
        ({"train": 100, "val": 0, "test": 0}, 1),  # never none
    ],
)
def test_auto_passes_keep_the_backbone_within_its_budget(sizes, passes):
    assert features.auto_passes(sizes) == passes


def test_cycled_passes_read_pass_e_mod_k():
    xs = [np.full((5, 1), k, dtype="float32") for k in range(3)]
    ys = [np.zeros(5, dtype="int64")] * 3
    passes = features.CycledPasses(xs, ys, batch_size=2, seed=0)
    seen = []
    for _ in range(4):
        seen.append({float(v) for i in range(len(passes)) for v in passes[i][0].ravel()})
        passes.on_epoch_end()
    assert seen == [{0.0}, {1.0}, {2.0}, {0.0}] and len(passes) == 3


def _args(*argv: str):
    return build_parser().parse_args(["train", *argv])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--search", "-1"], "search (--search): Input should be greater than or equal to 0"),
        (["--ensemble", "0"], "search_ensemble (--ensemble): Input should be greater than or equal to 1"),
        (
            ["--backbone", "simple_cnn", "--backbone-blocks", "last_two"],
            "backbone_blocks (--backbone-blocks): simple_cnn has no pretrained backbone",
        ),
        (["--augment-passes", "-2"], "augment_passes (--augment-passes): Input should be greater than"),
        (
            ["--backbone", "simple_cnn", "--search", "5"],
            "search (--search): simple_cnn has no frozen backbone",
        ),
        (["--no-augment", "--augment-passes", "2"], "augment_passes (--augment-passes): augmentation is off"),
        (
            ["--backbone", "simple_cnn", "--augment-passes", "2"],
            "augment_passes (--augment-passes): simple_cnn",
        ),
        (
            ["--ensemble-fit", "folds", "--fine-tune-layers", "2"],
            "ensemble_fit (--ensemble-fit): folds trains the heads on the validation images",
        ),
    ],
)
def test_bad_search_and_pass_flags_are_named(tmp_path, argv, message):
    with pytest.raises(ConfigError) as raised:
        config_from_args(_args("--data", str(tmp_path), *argv))
    assert message in str(raised.value)


def test_a_non_number_is_refused_by_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        _args("--data", str(tmp_path), "--search", "many")
    assert raised.value.code == 2
    assert "argument --search: invalid int value: 'many'" in capsys.readouterr().err
