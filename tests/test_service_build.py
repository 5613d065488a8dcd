"""Packaging and entry points of the service: `bentoml build`, `imgcls serve`, no TF import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from imgcls.cli import build_parser
from service.cli import serve_command, settings_env
from tests.service_fixtures import QUIET_ENV

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bentoml_build_succeeds_offline(tmp_path):
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", **QUIET_ENV}
    env.update(BENTOML_HOME=str(tmp_path / "home"), HOME=str(tmp_path))
    # Any attempt to reach an index (pip, uv) fails fast instead of passing unnoticed.
    env.update(PIP_INDEX_URL="http://127.0.0.1:9/simple", UV_OFFLINE="1", PIP_NO_INDEX="1")
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag", "."],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    bento = next((tmp_path / "home" / "bentos" / "imgcls").glob("*/bento.yaml")).parent
    assert (bento / "src" / "service" / "service.py").exists()
    assert (bento / "src" / "service" / "static" / "index.html").exists()
    assert (bento / "src" / "imgcls" / "images.py").exists()
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "tensorflow[and-cuda]==2.21.0" in requirements
    assert "nvidia/cuda" in (bento / "env" / "docker" / "Dockerfile").read_text()


def test_serve_options_become_settings_variables():
    args = build_parser().parse_args(
        ["serve", "--port", "3456", "--source", "mlflow", "--no-batching", "--top-k", "5"]
    )
    env = settings_env(args)
    assert env == {
        "IMGCLS_SERVE_PORT": "3456",
        "IMGCLS_SERVE_SOURCE": "mlflow",
        "IMGCLS_SERVE_BATCHING": "false",
        "IMGCLS_SERVE_TOP_K": "5",
    }
    command = serve_command("127.0.0.1", 3456)
    assert command[-6:] == ["--host", "127.0.0.1", "--port", "3456", "--timeout-graceful-shutdown", "30"]
    assert serve_command("127.0.0.1", 3456, None)[-2:] == ["--port", "3456"]


def test_every_serve_option_has_help():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    serve = sub.choices["serve"]
    assert all(action.help for action in serve._actions)


@pytest.mark.parametrize("path", [*sorted((ROOT / "service").glob("*.py")), ROOT / "imgcls" / "images.py"])
def test_inference_path_has_no_module_level_tensorflow_import(path):
    """TensorFlow is imported only inside functions guarded by the backend (JAX serving)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "tensorflow" for a in node.names)
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "tensorflow"
