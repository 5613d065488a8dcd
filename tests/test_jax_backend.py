"""The inference path runs on JAX: same `.keras` file, same probabilities, no TensorFlow."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from imgcls.images import load_image
from imgcls.modelcard import ModelCard
from service.predictor import Predictor
from tests.conftest import draw_shape, quick_config
from training.calibrate import with_temperature
from training.model import build_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")

# Runs in a fresh process where importing tensorflow fails, as on a machine without it.
JAX_SCRIPT = textwrap.dedent("""
    import builtins, json, sys
    real_import = builtins.__import__
    def guard(name, *args, **kwargs):
        if name.split(".")[0] == "tensorflow":
            raise ImportError("tensorflow is not available here")
        return real_import(name, *args, **kwargs)
    builtins.__import__ = guard
    import keras
    from imgcls.modelcard import ModelCard
    from service.predictor import Predictor
    folder = sys.argv[1]
    model = keras.saving.load_model(f"{folder}/model.keras", safe_mode=True)
    card = ModelCard.model_validate_json(open(f"{folder}/card.json").read())
    predictor = Predictor(model, card, "1")
    data = open(f"{folder}/image.png", "rb").read()
    probs = predictor.probabilities(predictor.preprocess(data)[None])
    png = predictor.explain(data)
    print(json.dumps({"backend": keras.backend.backend(), "probs": probs.tolist(),
                      "png": png[:4].hex(), "tensorflow": "tensorflow" in sys.modules}))
""")


def test_vgg16_model_saved_on_tensorflow_predicts_and_explains_on_jax(tmp_path):
    model = build_model(
        quick_config(tmp_path, backbone="vgg16", weights="none", **{"head.dense_units": [8]}), 3
    )
    model = with_temperature(model, 1.7)  # calibrated, as training saves it (training/calibrate.py)
    model.save(tmp_path / "model.keras")
    card = ModelCard(class_names=["a", "b", "c"], image_size=(32, 32), backbone="vgg16")
    (tmp_path / "card.json").write_text(card.model_dump_json())
    buffer = io.BytesIO()
    Image.fromarray(draw_shape("circle", 48, np.random.default_rng(0))).save(buffer, "PNG")
    (tmp_path / "image.png").write_bytes(buffer.getvalue())
    expected = Predictor(model, card, "1").probabilities(load_image(buffer.getvalue(), (32, 32))[None])

    env = os.environ | {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", JAX_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["backend"] == "jax" and result["tensorflow"] is False
    np.testing.assert_allclose(np.array(result["probs"]), expected, atol=1e-5)
    assert result["png"] == b"\x89PNG".hex()
