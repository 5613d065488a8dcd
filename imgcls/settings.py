"""Settings shared by every command: where MLflow lives and what things are called.

Read from environment variables (and an optional `.env`) when a command starts, never at
import. MLflow's own `MLFLOW_TRACKING_URI` and `MLFLOW_EXPERIMENT_NAME` are honoured.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TrackingSettings(BaseSettings):
    """Where runs, artifacts and registered models are stored."""

    # populate_by_name: `TrackingSettings(tracking_uri=...)` works besides the env aliases.
    model_config = SettingsConfigDict(
        env_prefix="IMGCLS_", env_file=".env", extra="ignore", populate_by_name=True
    )

    home: Path = Field(
        Path(".imgcls"),
        description="Local project data folder: SQLite MLflow store, artifacts, demo data.",
    )
    tracking_uri: str | None = Field(
        None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "IMGCLS_TRACKING_URI"),
        description="MLflow tracking URI; default: an SQLite store inside `home`.",
    )
    experiment_name: str = Field(
        "image-classifier",
        validation_alias=AliasChoices("MLFLOW_EXPERIMENT_NAME", "IMGCLS_EXPERIMENT_NAME"),
    )
    registered_model_name: str = Field(
        "image-classifier", description="Name of the model in the MLflow model registry."
    )

    def resolved_tracking_uri(self) -> str:
        """The tracking URI to use: the configured one or the embedded SQLite store."""
        if self.tracking_uri:
            return self.tracking_uri
        return f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    def artifact_root(self) -> str | None:
        """Artifact folder for new experiments when the store is local; None lets a server decide."""
        if self.resolved_tracking_uri().startswith("sqlite:///"):
            return (self.home / "mlartifacts").resolve().as_uri()
        return None
