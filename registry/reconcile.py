"""Champion moves made outside imgcls (MLflow's UI, a script): noticed, then recorded.

Anyone with write access to the registered model can set or delete the champion alias by
hand: the gate is bypassed and no history is written, so the history no longer ends at
the champion. `manual_move` is the pure comparison of the two. `record_manual_move` writes
the missing record, under the registry lock, as a move of action `manual` by
`unknown (outside imgcls)`. Only commands that write anyway call it (pipeline, `models
promote`, `models rollback`, before they plan); `models list` and `show` merely show a
pending one, so a user who may only read can still run them.

In the lineage a manual move counts as a promotion (`rollback` then goes back to the
champion before it); a removal of the alias ends the lineage. A recorded hand move also
updates the BentoML store like a promotion (not a removal: the store keeps the last
champion). One noticed only under the lock of a move in progress (made while that move's
gate ran) is recorded there without a BentoML copy: the store lags until the next move.
"""

from __future__ import annotations

import contextlib
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
    """Record a move made by hand, if there is one; the lock is taken only when there is.

    The hand-picked champion is downloaded first (outside the lock) and, once recorded,
    saved into the BentoML store as the champion, as a promotion would.
    """
    pending = pending_manual_move(client, settings)
    if pending is None:
        return None
    with contextlib.ExitStack() as stack:
        download = _download(stack, settings, pending.to_version)
        held = stack.enter_context(registry_lock(client, tracking, settings))
        return record_if_moved_by_hand(client, settings, held, download)


def record_if_moved_by_hand(
    client: MlflowClient, settings: RegistrySettings, held: Held | None = None, download=None
) -> AliasMove | None:
    """Holding the lock: re-read, and record the move made by hand if there still is one.

    `download` (a `registry.bento.Download`) is saved into BentoML if it is the new champion.
    """
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
    if download is not None and download.version == move.to_version:
        _mirror_in_bento(settings, download)
    return move


def _download(stack: contextlib.ExitStack, settings: RegistrySettings, version: str | None):
    """The version's model for BentoML, or None (import off, no version, or it cannot be fetched:
    the record matters more than the copy)."""
    if not settings.bento_import or version is None:
        return None
    from registry.bento import downloaded

    try:
        return stack.enter_context(downloaded(settings, version))
    except Exception:  # noqa: BLE001 - e.g. a version whose files are gone
        log.warning("version %s could not be downloaded for the BentoML store", version, exc_info=True)
        return None


def _mirror_in_bento(settings: RegistrySettings, download) -> None:
    from registry.bento import retire_earlier_champions, save_champion

    try:
        retire_earlier_champions(settings, keep=save_champion(settings, download))
    except Exception:  # noqa: BLE001 - bookkeeping after the record
        log.warning("version %s: not saved into the BentoML store", download.version, exc_info=True)


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
