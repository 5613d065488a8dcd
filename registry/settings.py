"""Typed settings of the model registry: which model, which alias, how strict the gate is.

Read from environment variables (prefix `IMGCLS_REGISTRY_`, and an optional `.env`) when a
command starts, never at import.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RegistrySettings(BaseSettings):
    """Where versions are registered and what a candidate must do to become champion."""

    model_config = SettingsConfigDict(
        env_prefix="IMGCLS_REGISTRY_", env_file=".env", extra="ignore", populate_by_name=True
    )

    model_name: str = Field(
        "image-classifier",
        # The same variable TrackingSettings.registered_model_name reads, so both agree.
        validation_alias=AliasChoices("IMGCLS_REGISTRY_MODEL_NAME", "IMGCLS_REGISTERED_MODEL_NAME"),
        description="Registered model name in the MLflow model registry.",
    )
    alias: str = Field("champion", description="Alias that marks the served model.")
    gate_metric: str = Field("macro_f1", description="Metric the gate compares (higher is better).")
    # One percentage point: smaller differences are within the noise of a re-run.
    margin: float = Field(0.01, ge=-1, le=1, description="How much the candidate must beat the champion by.")
    # Five points: a better average must not hide a class that got clearly worse.
    max_recall_drop: float = Field(0.05, ge=0, le=1, description="Largest allowed per-class recall drop.")
    # A first model below this is no better than guessing on a small problem.
    first_model_floor: float = Field(0.5, ge=0, le=1, description="Gate metric a first champion needs.")
    bento_import: bool = Field(True, description="Import each new champion into the BentoML store.")
    bento_model_name: str | None = Field(
        None, description="Model name in the BentoML store; default: model_name (the service's default)."
    )
    # Training a candidate takes minutes; waiting longer than this for the lock means a stuck peer.
    lock_timeout_s: float = Field(600.0, gt=0, description="Seconds to wait for the registry lock.")
    # A crashed process's remote lease expires after this; longer than any alias move takes.
    lease_s: float = Field(120.0, gt=0, description="Lifetime of a remote registry lease.")
    # While the lock is held a hung tracking server must fail a write in seconds: MLflow's
    # defaults (7 retries x 120 s) would hold the lock for about 20 minutes per request.
    locked_request_timeout_s: int = Field(
        5, gt=0, description="MLflow HTTP timeout per request while the registry lock is held."
    )
    locked_request_retries: int = Field(
        1, ge=0, le=10, description="MLflow HTTP retries per request while the registry lock is held."
    )

    @model_validator(mode="after")
    def _bento_name_follows_model_name(self) -> RegistrySettings:
        # One name unless told otherwise: the service looks for model_name in both stores.
        if not self.bento_model_name:
            self.bento_model_name = self.model_name
        return self
