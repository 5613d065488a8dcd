"""The `mlflow server` that shows the same store as training (`imgcls ui`)."""

from __future__ import annotations

from pathlib import Path

from imgcls.settings import TrackingSettings
from registry.server import server_env

# One worker is plenty for one person's browser and spares a small machine's cores.
UI_WORKERS = 1
# After SIGTERM, what uvicorn gets to answer the page's open requests before it is killed.
UI_GRACE_S = 10


def ui_env(tracking: TrackingSettings, host: str, port: int) -> dict[str, str]:
    """The environment of `mlflow server` on the local SQLite store, serving artifacts from
    `home/mlartifacts`, with the shared server settings (registry/mlflow-server.env).

    Creates the store's folder so a first `imgcls ui` works before any training.
    """
    uri = tracking.resolved_tracking_uri()
    Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    artifacts = (tracking.home / "mlartifacts").resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    return server_env(uri, str(artifacts), host, port, MLFLOW_WORKERS=str(UI_WORKERS))
