"""registry/server.py: the MLflow server's settings file, and the environment built from it."""

from __future__ import annotations

import pytest

from registry.server import SETTINGS_FILE, read_settings, server_command, server_env


def test_settings_file_is_plain_mlflow_variables_mlflow_reads():
    settings = read_settings()
    assert settings, SETTINGS_FILE
    # Each name is an option's envvar in MLflow 3.17's `mlflow server` (or a flag MLflow reads).
    known = {
        "MLFLOW_SERVER_ALLOWED_HOSTS",
        "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
        "MLFLOW_WORKERS",
        "MLFLOW_DISABLE_TELEMETRY",
    }
    assert set(settings) <= known, set(settings) - known


def test_server_options_come_from_the_environment_not_arguments(monkeypatch):
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")  # the user's choice wins
    env = server_env("postgresql://u@db/mlflow", "s3://b/artifacts", "127.0.0.1", 5001, MLFLOW_WORKERS="1")
    assert env["MLFLOW_BACKEND_STORE_URI"] == "postgresql://u@db/mlflow"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://b/artifacts"
    assert (env["MLFLOW_HOST"], env["MLFLOW_PORT"], env["MLFLOW_WORKERS"]) == ("127.0.0.1", "5001", "1")
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"
    assert env["MLFLOW_SERVER_ALLOWED_HOSTS"] == read_settings()["MLFLOW_SERVER_ALLOWED_HOSTS"]
    assert server_command()[-2:] == ["mlflow", "server"]
    assert server_command("basic-auth")[-2:] == ["--app-name", "basic-auth"]


def test_ui_uses_the_shared_settings_on_the_local_store(tmp_path, monkeypatch):
    from registry.ui import ui_env
    from tests.registry_fixtures import tracking_settings

    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    tracking = tracking_settings(tmp_path)
    env = ui_env(tracking, "127.0.0.1", 5055)
    assert env["MLFLOW_BACKEND_STORE_URI"] == tracking.resolved_tracking_uri()
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == str((tracking.home / "mlartifacts").resolve())
    assert env["MLFLOW_WORKERS"] == "1" and env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_a_malformed_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "server.env"
    path.write_text("# comment\n\nMLFLOW_WORKERS=2\nnot a setting\n")
    with pytest.raises(ValueError, match=r"server.env:4: expected KEY=VALUE"):
        read_settings(path)


def test_a_missing_stack_tool_fails_under_ci_and_skips_elsewhere(monkeypatch):
    from tests.stack import unavailable

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="team stack unavailable in CI: no postgres"):
        unavailable("no postgres")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no postgres"):
        unavailable("no postgres")
