"""The record of every champion alias move: one small registered-model tag per move.

Each move is a tag `imgcls.promotion.<seq>` (zero-padded, so tags sort in order) holding a
compact JSON summary: when, by whom, from which version to which, forced or not, the
reason, the gate metric's two values and the worst per-class recall drop. MLflow stores
registered-model tag values in a String(5000) column (enforced by PostgreSQL), so a
summary never grows with the number of classes or moves. The full numbers (every metric,
every class's recall) go to a tag of the same key on the version that became champion:
model-version tag values are unbounded Text. Tags are only written while the registry
lock is held, and a move is never rewritten: a failed read cannot erase the history.
"""

from __future__ import annotations

import contextlib
import getpass
import json
from datetime import UTC, datetime
from typing import Literal

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, Field

from registry.settings import RegistrySettings

MOVE_PREFIX = "imgcls.promotion."
LEGACY_TAG = "imgcls.promotions"  # the whole list in one tag, before 0.2: read, never written
# Written just before a move's record and deleted once the alias was read back: a record
# whose marker is still there when the alias is elsewhere is a move that never happened.
IN_FLIGHT_TAG = "imgcls.move_in_flight"
# Well under MLflow's String(5000) registered-model tag column; long reasons are cut to fit.
MAX_SUMMARY_CHARS = 2000
MAX_REASON_CHARS = 1000
MAX_CLASS_CHARS = 200


class AliasMove(BaseModel):
    """One move of the champion alias."""

    at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    # "manual": the alias was moved (or removed) outside imgcls, noticed and recorded later.
    action: Literal["promote", "rollback", "manual"]
    from_version: str | None
    to_version: str | None  # None only for a manual removal of the alias
    metric: str
    candidate_metrics: dict[str, float] = Field(default_factory=dict)
    champion_metrics: dict[str, float] = Field(default_factory=dict)
    reason: str
    forced: bool = False
    by: str = Field(default_factory=lambda: _user())
    seq: int | None = None  # its place in the history, set when it is recorded
    recall_drop: tuple[str, float] | None = None  # from a summary, whose metrics are cut

    def worst_recall_drop(self) -> tuple[str, float] | None:
        """(class, drop) of the class whose recall fell most from champion to candidate."""
        if self.recall_drop is not None:
            return self.recall_drop
        drops = {
            key.removeprefix("recall_"): old - self.candidate_metrics[key]
            for key, old in self.champion_metrics.items()
            if key.startswith("recall_") and key in self.candidate_metrics
        }
        if not drops:
            return None
        worst = max(drops, key=drops.get)
        return worst, drops[worst]


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


def move_key(seq: int) -> str:
    """The tag key of the `seq`-th move (1-based), zero-padded so keys sort in order."""
    return f"{MOVE_PREFIX}{seq:06d}"


def read_history(client: MlflowClient, settings: RegistrySettings) -> list[AliasMove]:
    """Every recorded alias move, oldest first; empty only when the model does not exist.

    Any other failure (network, server error, a malformed record) is raised: a caller must
    never mistake an unreadable history for an empty one.
    """
    return history_from_tags(model_tags(client, settings))


def model_tags(client: MlflowClient, settings: RegistrySettings) -> dict[str, str]:
    """The registered model's tags; empty only when the model does not exist (else raised)."""
    try:
        return client.get_registered_model(settings.model_name).tags
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return {}
        raise


def history_from_tags(tags: dict[str, str]) -> list[AliasMove]:
    """The recorded moves held in a registered model's tags, oldest first."""
    moves = [AliasMove.model_validate(item) for item in json.loads(tags.get(LEGACY_TAG) or "[]")]
    for index, move in enumerate(moves, start=1):
        move.seq = index
    for key in sorted(k for k in tags if k.startswith(MOVE_PREFIX)):
        moves.append(_from_summary(json.loads(tags[key]), int(key.removeprefix(MOVE_PREFIX))))
    return moves


def record_move(
    client: MlflowClient, settings: RegistrySettings, move: AliasMove, seq: int | None = None
) -> str:
    """Append `move` as number `seq` (default: after the last; full details on its target
    version, summary on the model); returns the summary's tag key. Call holding the lock."""
    move.seq = seq or len(read_history(client, settings)) + 1
    key = move_key(move.seq)
    details = json.dumps(move.model_dump(mode="json", exclude={"recall_drop"}), separators=(",", ":"))
    if move.to_version is None:  # a removed alias has no version to hold the details
        client.set_registered_model_tag(settings.model_name, key, summary_json(move))
        return key
    client.set_model_version_tag(settings.model_name, move.to_version, key, details)
    try:
        client.set_registered_model_tag(settings.model_name, key, summary_json(move))
    except BaseException:
        client.delete_model_version_tag(settings.model_name, move.to_version, key)
        raise
    return key


def forget_move(client: MlflowClient, settings: RegistrySettings, key: str, version: str | None) -> None:
    """Take back record `key` (of a move to `version`) whose alias change did not happen."""
    client.delete_registered_model_tag(settings.model_name, key)
    if version is not None:
        with contextlib.suppress(MlflowException):  # never written if the summary write failed first
            client.delete_model_version_tag(settings.model_name, version, key)


def in_flight(tags: dict[str, str]) -> dict | None:
    """The move marked in flight (`{"seq", "from", "to"}`), or None."""
    raw = tags.get(IN_FLIGHT_TAG)
    return json.loads(raw) if raw else None


def mark_in_flight(client: MlflowClient, settings: RegistrySettings, move: AliasMove, seq: int) -> None:
    """Say that move `seq` is being made: set before its record, cleared once the alias was read back."""
    marker = {"seq": seq, "from": move.from_version, "to": move.to_version}
    client.set_registered_model_tag(settings.model_name, IN_FLIGHT_TAG, json.dumps(marker))


def clear_in_flight(client: MlflowClient, settings: RegistrySettings) -> None:
    """Remove the in-flight marker (the move is settled either way)."""
    client.delete_registered_model_tag(settings.model_name, IN_FLIGHT_TAG)


def summary_json(move: AliasMove) -> str:
    """The compact JSON kept on the registered model; its size does not depend on the classes."""
    worst = move.worst_recall_drop()
    summary = {
        "at": move.at,
        "action": move.action,
        "from": move.from_version,
        "to": move.to_version,
        "forced": move.forced,
        "by": move.by[:100],
        "metric": move.metric,
        "candidate": move.candidate_metrics.get(move.metric),
        "champion": move.champion_metrics.get(move.metric),
        "worst_recall_drop": [worst[0][:MAX_CLASS_CHARS], round(worst[1], 6)] if worst else None,
        "reason": _cut(move.reason, MAX_REASON_CHARS),
    }
    value = json.dumps(summary, separators=(",", ":"))
    if len(value) > MAX_SUMMARY_CHARS:  # a metric name or user name far beyond reason
        summary["reason"] = _cut(move.reason, 100)
        summary["metric"] = move.metric[:MAX_CLASS_CHARS]
        value = json.dumps(summary, separators=(",", ":"))
    return value


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _from_summary(summary: dict, seq: int) -> AliasMove:
    metric = summary["metric"]
    return AliasMove(
        at=summary["at"],
        action=summary["action"],
        from_version=summary["from"],
        to_version=summary["to"],
        metric=metric,
        candidate_metrics={} if summary["candidate"] is None else {metric: summary["candidate"]},
        champion_metrics={} if summary["champion"] is None else {metric: summary["champion"]},
        reason=summary["reason"],
        forced=summary["forced"],
        by=summary["by"],
        seq=seq,
        recall_drop=tuple(summary["worst_recall_drop"]) if summary.get("worst_recall_drop") else None,
    )


def move_details(client: MlflowClient, settings: RegistrySettings, move: AliasMove) -> AliasMove:
    """The full record of a move (every metric, the whole reason), from its target version."""
    if move.seq is None or move.to_version is None:
        return move
    raw = client.get_model_version(settings.model_name, move.to_version).tags.get(move_key(move.seq))
    return AliasMove.model_validate(json.loads(raw)) if raw else move


def champion_lineage(moves: list[AliasMove]) -> list[str]:
    """Champions in order, a rollback undoing the promotion before it; last = current.

    A manual move counts as a promotion (a rollback after it goes back to the champion
    before it); a manual removal of the alias ends the lineage: nothing before it is
    rolled back to.
    """
    lineage: list[str] = []
    for move in moves:
        if move.to_version is None:
            lineage = []
        elif move.action == "rollback" and len(lineage) >= 2 and lineage[-2] == move.to_version:
            lineage.pop()
        else:
            lineage.append(move.to_version)
    return lineage


def moves_of(moves: list[AliasMove], version: str) -> list[AliasMove]:
    """The moves that made `version` champion or replaced it."""
    return [m for m in moves if version in (m.to_version, m.from_version)]
