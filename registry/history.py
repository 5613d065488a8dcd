"""The record of every champion alias move, kept as a JSON list in a registered-model tag.

One tag (`imgcls.promotions`) on the registered model holds the list, oldest first; it is
only written while the registry lock is held, so concurrent writers cannot lose events.
"""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime
from typing import Literal

from mlflow import MlflowClient
from pydantic import BaseModel, Field

from registry.settings import RegistrySettings

HISTORY_TAG = "imgcls.promotions"


class AliasMove(BaseModel):
    """One move of the champion alias."""

    at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    action: Literal["promote", "rollback"]
    from_version: str | None
    to_version: str
    metric: str
    candidate_metrics: dict[str, float] = Field(default_factory=dict)
    champion_metrics: dict[str, float] = Field(default_factory=dict)
    reason: str
    forced: bool = False
    by: str = Field(default_factory=lambda: _user())


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


def read_history(client: MlflowClient, settings: RegistrySettings) -> list[AliasMove]:
    """Every recorded alias move, oldest first (empty when the model has none)."""
    try:
        tags = client.get_registered_model(settings.model_name).tags
    except Exception:  # noqa: BLE001 - no registered model yet means no history
        return []
    raw = json.loads(tags.get(HISTORY_TAG) or "[]")
    return [AliasMove.model_validate(item) for item in raw]


def write_history(client: MlflowClient, settings: RegistrySettings, moves: list[AliasMove]) -> None:
    """Replace the stored list; call only while holding the registry lock."""
    value = json.dumps([m.model_dump(mode="json") for m in moves], separators=(",", ":"))
    client.set_registered_model_tag(settings.model_name, HISTORY_TAG, value)


def champion_lineage(moves: list[AliasMove]) -> list[str]:
    """Champions in order, a rollback undoing the promotion before it; last = current."""
    lineage: list[str] = []
    for move in moves:
        if move.action == "rollback" and len(lineage) >= 2 and lineage[-2] == move.to_version:
            lineage.pop()
        else:
            lineage.append(move.to_version)
    return lineage


def moves_of(moves: list[AliasMove], version: str) -> list[AliasMove]:
    """The moves that made `version` champion or replaced it."""
    return [m for m in moves if version in (m.to_version, m.from_version)]
