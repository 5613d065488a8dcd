"""The `mlflow server` process: its command and environment, built from one settings file.

`registry/mlflow-server.env` holds the server's non-secret settings as `MLFLOW_*`
variables (MLflow reads every server option from one). docker-compose.yml loads it with
`env_file:`, `imgcls ui` and the tests' team stack (tests/stack.py) read it here, so the
configuration that is tested is the one a team runs. Per-deployment values (the store,
the artifact destination, host and port) and secrets are passed as variables too, never
as arguments: a password in a store URI must not show up in `ps`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SETTINGS_FILE = Path(__file__).with_name("mlflow-server.env")


def read_settings(path: Path = SETTINGS_FILE) -> dict[str, str]:
    """The `KEY=VALUE` lines of an env file (blank lines and `#` comments skipped).

    The subset of the format that compose's `env_file:` and python-dotenv read the same
    way: no quotes, no interpolation, no `export`.
    """
    settings = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        settings[key] = value
    return settings


def server_command(app_name: str | None = None) -> list[str]:
    """`mlflow server` from this interpreter; `app_name="basic-auth"` turns on MLflow's auth.

    Every other option comes from the environment built by `server_env`.
    """
    command = [sys.executable, "-m", "mlflow", "server"]
    return [*command, "--app-name", app_name] if app_name else command


def server_env(
    backend_store_uri: str, artifacts_destination: str, host: str, port: int, **extra: str
) -> dict[str, str]:
    """The server's environment: the settings file, then this process's environment (a
    variable set there wins, e.g. `MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true`), then these.

    `extra` adds variables such as `MLFLOW_WORKERS`, `MLFLOW_S3_ENDPOINT_URL` and AWS keys
    for the server alone, or the basic-auth ones (`MLFLOW_AUTH_CONFIG_PATH`, ...).
    """
    return (
        read_settings()
        | dict(os.environ)
        | {
            "MLFLOW_BACKEND_STORE_URI": backend_store_uri,
            "MLFLOW_ARTIFACTS_DESTINATION": artifacts_destination,
            "MLFLOW_HOST": host,
            "MLFLOW_PORT": str(port),
        }
        | extra
    )
