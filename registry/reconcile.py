"""Champion moves made outside imgcls (MLflow's UI, a script): noticed, then recorded.

Anyone with write access to the registered model can set or delete the champion alias by
hand: the gate is bypassed and no history is written, so the history no longer ends at
the champion. `manual_move` is the pure comparison of the two. `record_manual_move` writes
the missing record, under the registry lock, as a move of action `manual` by
`unknown (outside imgcls)`. Only commands that write anyway call it (pipeline, `models
promote`, `models rollback`, before they plan); `models list` and `show` merely show a
pending one, so a user who may only read can still run them.

In the lineage a manual move counts as a promotion (`rollback` then goes back to the
champion before it); a removal of the alias ends the lineage.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from mlflow import MlflowClient

from imgcls.settings import TrackingSettings
from registry.gate import gate_subset
from registry.history import AliasMove, read_history, record_move
from registry.lock import Held, interrupts_deferred, registry_lock
from registry.register import champion_version, set_status, version_metrics
from registry.settings import RegistrySettings

log = logging.getLogger(__name__)

OUTSIDE = "unknown (outside imgcls)"
MOVED = "alias moved outside the gate"
REMOVED = "alias removed outside the gate"


def recorded_champion(moves: list[AliasMove]) -> str | None:
    """The champion the history says there is: where its last move left the alias."""
    return moves[-1].to_version if moves else None


def manual_move(
    moves: list[AliasMove], champion: str | None, metric: str, at: str | None = None
) -> AliasMove | None:
    """The move that explains `champion` when the history ends elsewhere; None if it agrees.

    `at` is when the move was noticed (default: now): MLflow keeps no time for an alias.
    """
    recorded = recorded_champion(moves)
    if champion == recorded:
        return None
    return AliasMove(
        at=at or datetime.now(UTC).isoformat(timespec="seconds"),
        action="manual",
        from_version=recorded,
        to_version=champion,
        metric=metric,
        reason=MOVED if champion is not None else REMOVED,
        by=OUTSIDE,
    )


def pending_manual_move(client: MlflowClient, settings: RegistrySettings) -> AliasMove | None:
    """A move made by hand that the history does not show yet (reads only)."""
    return manual_move(
        read_history(client, settings), champion_version(client, settings), settings.gate_metric
    )


def record_manual_move(
    client: MlflowClient, tracking: TrackingSettings, settings: RegistrySettings
) -> AliasMove | None:
    """Record a move made by hand, if there is one; the lock is taken only when there is."""
    if pending_manual_move(client, settings) is None:
        return None
    with registry_lock(client, tracking, settings) as held:
        return record_if_moved_by_hand(client, settings, held)


def record_if_moved_by_hand(
    client: MlflowClient, settings: RegistrySettings, held: Held | None = None
) -> AliasMove | None:
    """Holding the lock: re-read, and record the move made by hand if there still is one."""
    move = pending_manual_move(client, settings)
    if move is None:
        return None
    move.candidate_metrics = _figures(client, settings, move.to_version)
    move.champion_metrics = _figures(client, settings, move.from_version)
    with interrupts_deferred():
        if held is not None:
            held.check()
        record_move(client, settings, move)
    log.warning(
        "%s was moved outside imgcls: version %s -> %s; recorded as move %s",
        settings.alias,
        move.from_version,
        move.to_version,
        move.seq,
    )
    _after_record(client, settings, move)
    return move


def _figures(client: MlflowClient, settings: RegistrySettings, version: str | None) -> dict[str, float]:
    if version is None:
        return {}
    try:
        return gate_subset(version_metrics(client, settings, version))
    except Exception:  # noqa: BLE001 - a record without figures beats no record
        log.warning("no metrics for version %s", version, exc_info=True)
        return {}


def _after_record(client: MlflowClient, settings: RegistrySettings, move: AliasMove) -> None:
    """Bookkeeping once the move is recorded: the status tag and the descriptions."""
    from registry.describe import describe_after_move

    if move.to_version is not None:
        try:
            set_status(client, settings, move.to_version, "promoted")
        except Exception:  # noqa: BLE001 - the alias and the record are the truth
            log.warning("version %s: status tag not written", move.to_version, exc_info=True)
    describe_after_move(client, settings, move)
