"""The `mlflow server` command line that shows the same store as training."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from imgcls.settings import TrackingSettings

# One worker is plenty for one person's browser and spares a small machine's cores.
UI_WORKERS = 1


def server_command(tracking: TrackingSettings, host: str, port: int) -> list[str]:
    """`mlflow server` on the local SQLite store, serving artifacts from `home/mlartifacts`.

    Creates the store's folder so a first `imgcls ui` works before any training.
    """
    uri = tracking.resolved_tracking_uri()
    Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    artifacts = (tracking.home / "mlartifacts").resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--artifacts-destination",
        str(artifacts),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(UI_WORKERS),
    ]


def server_env() -> dict[str, str]:
    """The environment for the server: MLflow's GenAI job runners off unless asked for.

    They start seven background processes (judges, trace archival) that the runs and the
    registry of an image classifier never use.
    """
    return os.environ | {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    }
