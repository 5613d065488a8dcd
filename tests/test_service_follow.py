"""A running `bentoml serve` follows the champion alias of a real MLflow registry (SQLite),
under steady load, across two models with different class sets and input sizes."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from imgcls.modelcard import ModelCard
from imgcls.processes import ServerProcess, free_port
from service.cli import serve_command
from tests.service_fixtures import (
    Clients,
    build_tiny_model,
    colour_image,
    encode,
    log_keras_model,
    log_parity,
    parity_set,
    service_env,
    tiny_card,
)

pytestmark = pytest.mark.slow
NAME = "follow-clf"
V1_CLASSES = ["red", "green", "blue"]
V2_CLASSES = ["rot", "gruen", "blau", "grau"]  # other names, one more class, 40x40 inputs
POLL_S = 0.5


def build_wide_model():
    """Input(40,40,3) -> 4 classes; a red/green/blue image gets rot/gruen/blau."""
    import keras

    inputs = keras.Input((40, 40, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, activation="softmax", name="head")(x)
    model = keras.Model(inputs, outputs)
    kernel = np.zeros((3, 3, 3, 4), np.float32)
    kernel[1, 1, :, :3] = np.eye(3) * 2 - 0.5
    model.get_layer("conv").set_weights([kernel, np.zeros(4, np.float32)])
    model.get_layer("head").set_weights([np.eye(4, dtype=np.float32) * 6, np.zeros(4, np.float32)])
    return model


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """An SQLite MLflow registry with v1 (3 classes, 32x32), v2 (4 classes, 40x40), both
    with parity sets (served compiled), and v3 (its card names 5 classes for a 3-class
    model: it must never be served)."""
    import mlflow

    root = tmp_path_factory.mktemp("follow")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("follow", (root / "art").as_uri()))
    wide = ModelCard(class_names=V2_CLASSES, image_size=(40, 40), backbone="wide-cnn")
    broken = tiny_card().model_copy(update={"class_names": list("abcde")})
    for model, card, parity in (
        (build_tiny_model(), tiny_card(), parity_set()),
        (build_wide_model(), wide, parity_set((40, 40))),
        (build_tiny_model(), broken, None),
    ):
        with mlflow.start_run():
            info = log_keras_model(model, card)
        if parity is not None:
            log_parity(info.model_id, parity, root)
        mlflow.register_model(info.model_uri, NAME)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(NAME, "champion", "1")
    yield {"uri": uri, "root": root, "client": client}
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def serve(registry, tracking_uri: str, log_name: str, **settings):
    root = registry["root"]
    env = service_env(
        root / "bentoml", source="mlflow", model_name=NAME, cache_dir=root / "cache", **settings
    )
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    port = free_port()
    cwd = Path(__file__).resolve().parents[1]
    url = f"http://127.0.0.1:{port}"
    return ServerProcess(serve_command("127.0.0.1", port), f"{url}/readyz", root / log_name,
                         env=env, cwd=cwd, port=port, timeout_s=150)  # fmt: skip


def assert_no_answer_mixes_versions(answers) -> None:
    expected = {"1": ["red", "green", "blue"], "2": ["rot", "gruen", "blau"]}
    for _, batch, body in answers:
        if batch:
            assert [r["predictions"][0]["label"] for r in body["results"]] == expected[body["version"]], body
        else:
            assert body["predictions"][0]["label"] == expected[body["version"]][0], body
            labels = {p["label"] for p in body["predictions"]}
            assert labels <= set(V1_CLASSES if body["version"] == "1" else V2_CLASSES), body


def test_a_running_service_follows_promotion_rollback_and_a_bad_version(registry):
    client = registry["client"]
    with serve(registry, registry["uri"], "follow.log", poll_interval_s=POLL_S, model_workers=2) as srv:
        url = srv.url
        assert httpx.get(f"{url}/metadata").json()["version"] == "1"
        with Clients(url) as clients:
            clients.wait_for("1")
            client.set_registered_model_alias(NAME, "champion", "2")  # a promotion
            clients.wait_for("2")
            client.set_registered_model_alias(NAME, "champion", "1")  # a rollback
            clients.wait_for("1")
            client.set_registered_model_alias(NAME, "champion", "3")  # fails its checks
            time.sleep(8 * POLL_S)
            mark = time.monotonic()
            time.sleep(1.0)
            assert clients.versions_since(mark) == {"1"}
            meta = httpx.get(f"{url}/metadata").json()
            assert httpx.get(f"{url}/readyz").status_code == 200
            client.set_registered_model_alias(NAME, "champion", "2")
            clients.wait_for("2")
        assert clients.failures == [], clients.failures[:5]
        assert len(clients.answers) > 50
        assert_no_answer_mixes_versions(clients.answers)
        assert {(body["runtime"], body["precision"]) for _, _, body in clients.answers} == {
            ("openvino", "f32")
        }
        assert meta["version"] == "1" and meta["following"]["failed_loads"] >= 1
        assert "5 classes" in meta["following"]["last_error"]
        after = httpx.get(f"{url}/metadata").json()
        assert after["class_names"] == V2_CLASSES and after["image_size"] == [40, 40]
        assert after["following"]["class_set_changes"][-1]["added"] == V2_CLASSES
        assert after["origin"] == "mlflow" and after["loaded_at"]
        assert (
            after["runtime"]["name"] == "openvino"
            and "matched Keras on 60 parity images" in after["runtime"]["reason"]
        )
        metrics = _metrics_once(url, lambda m: _value(m, "imgcls_model_swaps_total") >= 6)  # 3 x 2 workers
        assert _value(metrics, "imgcls_model_load_failures_total") >= 2
        assert 'imgcls_served_model_info{model="follow-clf",version="2"} 1.0' in metrics
        assert 'imgcls_served_model_info{model="follow-clf",version="1"} 0.0' in metrics
        runtimes = [line for line in metrics.splitlines() if line.startswith("imgcls_runtime_info{")]
        assert [r for r in runtimes if r.endswith(" 1.0")] == [
            next(r for r in runtimes if 'runtime="openvino"' in r and 'precision="f32"' in r)
        ], runtimes


def test_one_process_follows_a_promotion_under_load(registry):
    """`--one-process`: the front's own start hook runs the follower BentoML would start
    in a model process; a swap there mixes no versions either."""
    client = registry["client"]
    client.set_registered_model_alias(NAME, "champion", "1")
    with serve(registry, registry["uri"], "one-process.log", poll_interval_s=POLL_S, one_process=True) as srv:
        with Clients(srv.url) as clients:
            clients.wait_for("1")
            client.set_registered_model_alias(NAME, "champion", "2")
            clients.wait_for("2")
        assert clients.failures == [], clients.failures[:5]
        assert_no_answer_mixes_versions(clients.answers)
        meta = httpx.get(f"{srv.url}/metadata").json()
        assert meta["version"] == "2" and meta["image_size"] == [40, 40]


def test_a_restart_while_mlflow_is_down_serves_the_cached_champion(registry):
    """After the test above the cache holds version 2, the last champion it loaded."""
    dead = f"http://127.0.0.1:{free_port()}"
    with serve(registry, dead, "cached.log", poll_interval_s=POLL_S) as srv:
        url = srv.url
        meta = httpx.get(f"{url}/metadata").json()
        assert meta["version"] == "2" and meta["origin"] == "cache" and meta["runtime"]["name"] == "openvino"
        red = encode(colour_image("red", size=(60, 50)), "JPEG")
        body = httpx.post(f"{url}/predict", files={"image": ("red.jpg", red)}, timeout=30).json()
        assert (
            body["version"] == "2"
            and body["predictions"][0]["label"] == "rot"
            and body["runtime"] == "openvino"
        )
        time.sleep(3 * POLL_S)
        assert "cannot read the champion" in httpx.get(f"{url}/metadata").json()["following"]["last_error"]


def test_a_pinned_replica_does_not_follow(registry):
    registry["client"].set_registered_model_alias(NAME, "champion", "2")
    with serve(registry, registry["uri"], "pinned.log", version="1", poll_interval_s=POLL_S) as srv:
        url = srv.url
        time.sleep(4 * POLL_S)
        meta = httpx.get(f"{url}/metadata").json()
        assert meta["version"] == "1" and meta["following"]["poll_interval_s"] == 0


def _metrics_once(url: str, condition, timeout_s: float = 20) -> str:
    """/metrics as soon as `condition` holds on it (every model worker has caught up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = httpx.get(f"{url}/metrics").text
        if condition(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.5)


def _value(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name))


def test_cache_keeps_the_champion_and_the_one_before(tmp_path: Path):
    from service.sources import ModelCache

    cache = ModelCache(tmp_path / "c")
    source = tmp_path / "m.keras"
    source.write_bytes(b"x")
    for version in ("1", "2", "3"):
        cache.put(version, source, tiny_card())
        time.sleep(0.01)
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.is_dir()) == ["2", "3"]
    assert cache.champion()[0] == "3" and cache.champion("2")[0] == "2" and cache.champion("1") is None
