"""The compiled build of a served version (service/compiled.py): built from the Keras
model, checked against it on the version's parity set, refused when it disagrees, one
build for every process, and Keras whenever it cannot serve."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgcls import parity
from service import compiled
from service.compiled import compile_verified, export_build
from service.follower import prepare
from service.predictor import Predictor
from service.settings import ServiceSettings
from service.sources import build_follower
from tests.service_fixtures import build_tiny_model, log_keras_model, log_parity, parity_set, tiny_card

NAME = "compiled-clf"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """An SQLite MLflow registry: v1 with a parity set (champion), v2 registered before
    parity sets were stored."""
    import mlflow

    root = tmp_path_factory.mktemp("compiled")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("compiled", (root / "art").as_uri()))
    for images in (parity_set(), None):
        with mlflow.start_run():
            info = log_keras_model(build_tiny_model(), tiny_card())
        if images is not None:
            log_parity(info.model_id, images, root)
        mlflow.register_model(info.model_uri, NAME)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", "1")
    yield {"uri": uri, "root": root}
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _serve(registry, monkeypatch, cache: Path, **settings) -> Predictor:
    monkeypatch.setenv("IMGCLS_TRACKING_URI", registry["uri"])
    values = {"source": "mlflow", "model_name": NAME, "cache_dir": cache, "poll_interval_s": 0}
    return build_follower(ServiceSettings(**(values | settings))).served.predictor


def _no_bf16_reason(images: int) -> str:
    """Why auto stays f32 here: this CPU's capabilities first, then the parity set's size."""
    if "BF16" not in compiled.openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return "the CPU reports no BF16"
    return f"bf16 needs 200 parity images, this version has {images}"


def _tiny(version: str = "1") -> Predictor:
    return Predictor(build_tiny_model(), tiny_card(), version)


def test_a_registered_version_serves_its_verified_build(registry, monkeypatch, tmp_path):
    predictor = _serve(registry, monkeypatch, tmp_path / "cache")
    assert predictor.engine is not None
    assert predictor.metadata()["runtime"] == {
        "name": "openvino",
        "precision": "f32",  # 60 parity images: too few to check bf16 on any CPU
        "reason": f"auto: {_no_bf16_reason(60)}; matched Keras on 60 parity images",
    }
    x = parity_set().astype(np.float32)
    expected = predictor.model.predict_on_batch(x)
    np.testing.assert_allclose(predictor.probabilities(x), expected, atol=compiled.F32_BOUND)
    assert [p[0]["label"] for p in predictor.predict(list(x[:3]))] == ["red", "green", "blue"]
    folder = tmp_path / "cache" / NAME / "1"
    assert (folder / parity.PARITY_FILE).is_file() and (folder / "model.keras").is_file()
    (build,) = folder.glob("openvino-*")
    assert (build / "model.xml").is_file() and list((build / "compiled").glob("*.blob"))


def test_runtime_keras_builds_nothing(registry, monkeypatch, tmp_path):
    predictor = _serve(registry, monkeypatch, tmp_path / "cache", runtime="keras")
    assert predictor.engine is None and predictor.runtime == compiled.KERAS
    assert not list((tmp_path / "cache").rglob("model.xml"))


def test_a_version_without_parity_serves_keras_with_one_log_line(registry, monkeypatch, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="service.compiled"):
        predictor = _serve(registry, monkeypatch, tmp_path / "cache", version="2")
    assert predictor.engine is None and predictor.runtime.fallback
    assert "no parity set" in predictor.metadata()["runtime"]["reason"]
    lines = [r.getMessage() for r in caplog.records if r.name == "service.compiled"]
    assert len(lines) == 1 and "version 2 serves Keras" in lines[0], lines


def test_a_model_trained_with_augmentation_serves_compiled(tmp_path):
    # The augmentation block's random image ops have no OpenVINO conversion: the build
    # leaves the block out (identity at inference) and still matches Keras.
    from training.config import load_config
    from training.model import build_model

    config = load_config(None, data=tmp_path, backbone="simple_cnn", image_size=32)
    model = build_model(config, 3)
    assert config.augment.active and "augmentation" in [layer.name for layer in model.layers]
    predictor = Predictor(model, tiny_card(), "1")
    compile_verified(predictor, "auto", "f32", tmp_path / "build", parity_set())
    assert predictor.runtime.name == "openvino", predictor.runtime.reason


def test_a_corrupted_build_is_refused_and_keras_serves(tmp_path):
    predictor = _tiny()
    export_build(predictor.model, tmp_path)
    weights = tmp_path / "model.bin"
    noise = np.random.default_rng(0).normal(0, 50, weights.stat().st_size // 4).astype(np.float32)
    weights.write_bytes(noise.tobytes())
    compile_verified(predictor, "auto", "auto", tmp_path, parity_set())
    assert predictor.engine is None and predictor.runtime.fallback
    assert "f32 build" in predictor.runtime.reason or "the build failed" in predictor.runtime.reason
    assert [p[0]["label"] for p in predictor.predict(list(parity_set()[:3].astype(np.float32)))] == [
        "red",
        "green",
        "blue",
    ]


def test_a_build_outside_the_bound_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(compiled, "F32_BOUND", -1.0)  # no difference is small enough
    predictor = _tiny()
    compile_verified(predictor, "openvino", "f32", tmp_path, parity_set())
    assert predictor.engine is None
    assert "f32 build: max probability difference" in predictor.runtime.reason


def test_keras_reference_is_computed_once_per_build_folder_and_parity_set(tmp_path, monkeypatch):
    """Another worker or a restart checks the build against the kept Keras probabilities;
    an unreadable file, or another parity set, is computed again."""
    model, calls = build_tiny_model(), []
    keras_probabilities = compiled._keras_probabilities
    monkeypatch.setattr(
        compiled, "_keras_probabilities", lambda m, x: calls.append(len(x)) or keras_probabilities(m, x)
    )

    def serve(images) -> Predictor:
        predictor = Predictor(model, tiny_card(), "1")
        compile_verified(predictor, "openvino", "f32", tmp_path, images)
        assert predictor.runtime.name == "openvino", predictor.runtime.reason
        return predictor

    serve(parity_set())
    serve(parity_set())
    assert calls == [len(parity_set())]
    (kept,) = tmp_path.glob("reference-*.npy")
    kept.write_bytes(b"not numpy")
    serve(parity_set())
    serve(parity_set()[:2])
    assert calls == [len(parity_set()), len(parity_set()), 2]
    assert len(list(tmp_path.glob("reference-*.npy"))) == 2


def test_a_verdict_is_kept_per_build_and_checked_again_when_a_byte_changes(tmp_path, monkeypatch):
    """A restart or a rollback reads the kept verdict instead of running the build on the
    parity set again; a build file changed since is checked again, and refused."""
    model, runs = build_tiny_model(), []
    batched = compiled._batched
    monkeypatch.setattr(compiled, "_batched", lambda engine, x: runs.append(len(x)) or batched(engine, x))

    def serve() -> Predictor:
        predictor = Predictor(model, tiny_card(), "1")
        compile_verified(predictor, "openvino", "f32", tmp_path, parity_set())
        return predictor

    assert serve().runtime.name == "openvino" and serve().runtime.name == "openvino"
    assert runs == [len(parity_set())] and len(list(tmp_path.glob("verdict-*.txt"))) == 1
    weights = tmp_path / "model.bin"
    data = bytearray(weights.read_bytes())
    # The biggest float32 constant of the IR (a kernel), not a shape or an axis, so it compiles.
    consts = re.findall(r'element_type="f32" shape="[^"]*" offset="(\d+)" size="(\d+)"',
                        (tmp_path / "model.xml").read_text())  # fmt: skip
    offset = int(max(consts, key=lambda const: int(const[1]))[0])
    data[offset : offset + 64] = np.full(16, 1e6, np.float32).tobytes()
    weights.write_bytes(bytes(data))
    refused = serve()
    assert runs == [len(parity_set())] * 2, refused.runtime
    assert refused.engine is None and refused.runtime.fallback, refused.runtime


def test_bf16_needs_enough_parity_images_and_a_cpu_that_has_it(tmp_path):
    predictor = _tiny()
    compile_verified(predictor, "auto", "bf16", tmp_path, parity_set())
    assert predictor.engine is None and predictor.runtime.fallback
    assert "--precision bf16" in predictor.runtime.reason


def test_when_openvino_cannot_load_keras_serves(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino: ImportError
    compiled.openvino.cache_clear()
    try:
        predictor = prepare(_tiny(), _Source(tmp_path), "1")
    finally:
        compiled.openvino.cache_clear()
    assert predictor.engine is None and predictor.runtime.fallback
    assert "OpenVINO cannot be loaded here" in predictor.runtime.reason
    assert predictor.predict([parity_set()[0].astype(np.float32)])[0][0]["label"] == "red"


class _Source:
    def __init__(self, folder: Path):
        self.folder = folder

    def compile(self, key: str, predictor: Predictor) -> None:
        compile_verified(predictor, "auto", "auto", compiled.build_folder(self.folder / key), parity_set())


def test_three_processes_compile_one_build(tmp_path):
    """Three model workers loading one version at once: one export, the others wait for
    it and read it; each serves the build."""
    model_file = tmp_path / "tiny.keras"
    build_tiny_model().save(model_file)
    parity.save(parity_set(), tmp_path / parity.PARITY_FILE)
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
        "from pathlib import Path; from imgcls import parity; from service.compiled import compile_verified; "
        "from service.predictor import Predictor; from service.store import load_keras; "
        "from tests.service_fixtures import tiny_card; "
        "p = Predictor(load_keras(sys.argv[1]), tiny_card(), '1'); "
        "compile_verified(p, 'auto', 'auto', Path(sys.argv[2]), parity.load(Path(sys.argv[3]))); "
        "print('RUNTIME', p.runtime.name)"
    )
    args = [
        sys.executable,
        "-c",
        code,
        str(model_file),
        str(tmp_path / "build"),
        str(tmp_path / parity.PARITY_FILE),
    ]
    root = Path(__file__).resolve().parents[1]
    workers = [subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(3)]  # fmt: skip
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert all("RUNTIME openvino" in out for out in outputs), outputs
    assert sum(out.count("exported the OpenVINO build") for out in outputs) == 1, outputs
