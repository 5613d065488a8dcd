"""Real training runs on tiny data, tracked in a real MLflow SQLite store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import keras
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from imgcls import parity
from imgcls.images import PREPROCESSING_VERSION, load_image
from tests.conftest import quick_config, run_artifacts
from training.config import ConfigError
from training.train import train

NO_AUGMENT = {"augment.enabled": False}


def test_tiny_dataset_is_learned(shapes_dir_shared, tracking):
    config = quick_config(shapes_dir_shared, epochs=25, learning_rate=3e-3, **NO_AUGMENT)
    result = train(config, tracking)
    loss, accuracy = result.history["loss"], result.history["accuracy"]
    assert loss[-1] < 0.5 * loss[0]
    assert accuracy[-1] > accuracy[0] and max(accuracy) >= 0.9


def test_run_records_config_curves_metrics_pictures_and_model(shapes_dir_shared, tracking):
    config = quick_config(shapes_dir_shared, backbone="vgg16", weights="none", epochs=2, **NO_AUGMENT)
    result = train(config, tracking)
    client = MlflowClient(tracking.resolved_tracking_uri())
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone"] == "vgg16" and run.data.params["head.pooling"] == "avg"
    assert int(run.data.params["params.frozen"]) > int(run.data.params["params.trainable"]) > 0
    assert run.data.tags["dataset.fingerprint"] == result.scan.fingerprint
    assert {"test_accuracy", "test_macro_f1", "test_recall_circle", "test_f1_stripes"} <= set(
        run.data.metrics
    )
    assert len(client.get_metric_history(result.run_id, "val_loss")) == len(result.history["loss"])
    assert {
        "plots/confusion_matrix.png",
        "plots/training_curves.png",
        "plots/first_layer_kernels.png",
        "plots/activation_maps.png",
        "data/data_report.json",
        "data/split.json",
        "model/summary.txt",
        "model_card.json",
    } <= run_artifacts(client, result.run_id)
    assert run.inputs.dataset_inputs[0].dataset.digest == result.scan.fingerprint


def test_logged_model_reloads_with_its_card_and_predicts_the_same(shapes_dir_shared, tracking, tmp_path):
    result = train(quick_config(shapes_dir_shared, epochs=2, **NO_AUGMENT), tracking)
    mlflow.set_tracking_uri(tracking.resolved_tracking_uri())
    info = mlflow.models.get_model_info(result.model_uri)
    assert info.metadata["class_names"] == ["circle", "square", "stripes"]
    assert info.metadata["image_size"] == [32, 32]
    assert info.metadata["preprocessing"] == PREPROCESSING_VERSION  # the resize it was trained on
    assert info.signature is not None and info.saved_input_example_info is not None
    reloaded = mlflow.keras.load_model(result.model_uri)
    files = [shapes_dir_shared / rel for rel, _ in result.scan.files["test"]]
    pixels = np.stack([load_image(f.read_bytes(), (32, 32)) for f in files])
    np.testing.assert_allclose(
        reloaded.predict_on_batch(pixels), result.model.predict_on_batch(pixels), atol=1e-6
    )
    # The parity set a compiled build is checked on: every image of this tiny set (< 200),
    # the test split first, as the model's uint8 inputs.
    folder = mlflow.artifacts.download_artifacts(artifact_uri=result.model_uri, dst_path=str(tmp_path))
    images = parity.load(parity.find(folder))
    assert images.dtype == np.uint8 and images.shape == (sum(map(len, result.scan.files.values())), 32, 32, 3)
    np.testing.assert_array_equal(images[: len(pixels)], pixels.astype(np.uint8))


@pytest.mark.slow
def test_augmented_resnet_with_fine_tuning(shapes_dir_shared, tracking):
    config = quick_config(
        shapes_dir_shared,
        backbone="resnet50",
        weights="none",
        epochs=2,
        **{"fine_tune.unfreeze_layers": 3, "fine_tune.epochs": 1},
    )
    result = train(config, tracking)
    assert len(result.history["loss"]) == 3 and "val_loss" in result.history
    client = MlflowClient(tracking.resolved_tracking_uri())
    assert "plots/augmentation_preview.png" in run_artifacts(client, result.run_id)
    assert int(client.get_run(result.run_id).data.params["fine_tune.layers_unfrozen"]) > 0
    assert [m.step for m in client.get_metric_history(result.run_id, "loss")] == [0, 1, 2]


def test_same_seed_same_model(shapes_dir_shared, tracking):
    config = quick_config(shapes_dir_shared, epochs=2, seed=7)
    first, second = train(config, tracking), train(config, tracking)
    assert first.scan.files == second.scan.files
    for a, b in zip(first.model.get_weights(), second.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_failing_run_is_marked_failed(shapes_dir_shared, tracking, tmp_path):
    wrong = tmp_path / "resnet.weights.h5"
    keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(wrong)
    config = quick_config(shapes_dir_shared, backbone="vgg16", weights=str(wrong))
    with pytest.raises(ConfigError, match="weights: .*does not fit"):
        train(config, tracking)
    client = MlflowClient(tracking.resolved_tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name(tracking.experiment_name).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.search_registered_models() == []


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(shapes_dir_shared, tmp_path):
    """Every training path under MirroredStrategy: plain CNN, cached head, augmented head
    with fine-tuning."""
    script = textwrap.dedent(f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from imgcls.settings import TrackingSettings
        from tests.conftest import quick_config, run_artifacts
        from training.train import train
        settings = TrackingSettings(home={str(tmp_path)!r}, tracking_uri="sqlite:///{tmp_path}/m.db")
        data = {str(shapes_dir_shared)!r}
        configs = [
            quick_config(data, epochs=1, distribute="mirrored"),
            quick_config(data, backbone="vgg16", weights="none", epochs=1, distribute="mirrored",
                         **{{"augment.enabled": False}}),
            quick_config(data, backbone="vgg16", weights="none", epochs=1, distribute="mirrored",
                         **{{"fine_tune.unfreeze_layers": 2, "fine_tune.epochs": 1}}),
        ]
        for config in configs:
            train(config, settings)
        print("REPLICAS", tf.distribute.MirroredStrategy().num_replicas_in_sync, "RUNS", len(configs))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=400, cwd=os.getcwd()
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REPLICAS 2 RUNS 3" in out.stdout


def test_offline_imagenet_weights_give_a_clear_message(tmp_path):
    script = textwrap.dedent("""
        from training.model import build_backbone
        from training.config import ConfigError
        try:
            build_backbone("vgg16", "imagenet", (32, 32))
        except ConfigError as exc:
            print("CONFIG-ERROR", exc)
    """)
    dead = "http://127.0.0.1:9"  # nothing listens: the download fails at once, as offline
    env = os.environ | {
        "KERAS_HOME": str(tmp_path),
        "HTTPS_PROXY": dead,
        "HTTP_PROXY": dead,
        "https_proxy": dead,
    }
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert "CONFIG-ERROR weights: could not get the ImageNet weights of vgg16" in out.stdout, out.stderr[
        -2000:
    ]
    assert "--weights PATH" in out.stdout


def _quick_train_args(data, epochs: int) -> list[str]:
    """`imgcls train` options for a few-second run of the small CNN at 32x32."""
    return ["--data", str(data), "--backbone", "simple_cnn", "--image-size", "32", "--epochs", str(epochs)]


def test_cli_trains_with_mlflow_environment_variables(shapes_dir_shared, tmp_path):
    env = os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/cli.db",
        "MLFLOW_EXPERIMENT_NAME": "cli-exp",
    }
    args = [*_quick_train_args(shapes_dir_shared, epochs=2), "--no-augment"]
    out = subprocess.run(
        [sys.executable, "-m", "imgcls.cli", "train", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "run id:" in out.stdout and "macro-F1" in out.stdout and "recall circle" in out.stdout
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert len(client.search_runs([client.get_experiment_by_name("cli-exp").experiment_id])) == 1


def test_cli_rejects_bad_options_with_the_field_name(shapes_dir_shared, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "imgcls.cli", "train", "--data", str(shapes_dir_shared), "--epochs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "epochs" in out.stdout
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "imgcls.cli",
            "train",
            "--data",
            str(tmp_path / "none"),
            "--backbone",
            "simple_cnn",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert (
        out.returncode == 2
        and "dataset folder not found" in out.stdout
        and str(tmp_path / "none") in out.stdout
    )


@pytest.mark.slow
def test_two_trainings_started_together_on_a_new_store_both_finish(shapes_dir_shared, tmp_path):
    """Store creation, the experiment and the dataset record are made by whichever run
    gets there first; the other must not fail on the collision."""
    env = os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/race.db",
        "MLFLOW_EXPERIMENT_NAME": "race",
    }
    args = ["train", *_quick_train_args(shapes_dir_shared, epochs=1)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "imgcls.cli", *args],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]


# Lines a user cannot act on (issue 12); each must stay off the terminal of `imgcls train`.
NOISE = [
    "Your input ran out of data",
    "`shuffle=True` was passed",
    "use_unbounded_threadpool",
    "oneDNN custom operations",
    "absl::InitializeLog()",
    "Creating initial MLflow database tables",
    "Downloading artifacts",
]


def test_cli_train_prints_only_what_a_user_can_act_on(shapes_dir_shared, tmp_path):
    """Its own lines, one line per epoch and the results; none of the known noise, and a
    warning a user can act on (a file left out) still shows."""
    data = shutil.copytree(shapes_dir_shared, tmp_path / "data")
    (data / "circle" / "notes.txt").write_text("not an image")
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/quiet.db", "IMGCLS_HOME": str(tmp_path)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it
    args = [*_quick_train_args(data, epochs=2), "--augment", "photo", "--class-weight", "balanced"]
    out = subprocess.run(
        [sys.executable, "-m", "imgcls.cli", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=300,
        cwd=os.getcwd(),
    )
    assert out.returncode == 0, out.stdout[-3000:]
    text = out.stdout
    assert not [line for line in text.splitlines() if any(noise in line for noise in NOISE)], text
    assert "MLflow run " in text and "augmentation: photo (set by the user" in text
    assert "Epoch 1/2" in text and "Epoch 2/2" in text and text.count("val_loss:") == 2
    assert "run id:" in text and "macro-F1" in text and "recall stripes" in text
    assert "left out circle/notes.txt: not an image file (.txt)" in text
