"""The HTTP front keeps off the GPU (issue 11): only the model process may hold one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

FRONT = textwrap.dedent("""
    import json, os, sys
    from service.predictor import keep_off_accelerators
    keep_off_accelerators()
    from imgcls.images import prepare_image  # the front's resize
    import numpy as np
    prepare_image(np.zeros((8, 8, 3), np.uint8), (4, 4))
    import jax
    print(json.dumps({"platforms": sorted({d.platform for d in jax.devices()}),
                      "cuda": os.environ["CUDA_VISIBLE_DEVICES"],
                      "preallocate": os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"]}))
""")


def test_front_process_sees_only_the_cpu_even_when_told_to_use_cuda():
    env = os.environ | {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cuda,cpu", "CUDA_VISIBLE_DEVICES": "0"}
    out = subprocess.run([sys.executable, "-c", FRONT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "platforms": ["cpu"],
        "cuda": "",
        "preallocate": "false",
    }


def test_a_front_that_imported_a_framework_first_says_so(caplog, monkeypatch):
    import service.predictor as predictor

    for key in predictor.FRONT_ENV:  # restored after the test, whatever the call sets
        monkeypatch.setenv(key, os.environ.get(key, "unset"))
    monkeypatch.setitem(sys.modules, "jax", sys.modules.get("jax", type(sys)("jax")))  # as if imported
    predictor.keep_off_accelerators()
    assert "may still hold a GPU" in caplog.text
