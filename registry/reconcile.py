"""The alias is the truth: the next command makes the history, the status tags and the
BentoML store agree with it, after a hand move or a promotion that died half-way.

Two kinds of drift:

- **A move that never finished.** A promotion marks its move in flight
  (`imgcls.move_in_flight`) before writing the record and clears the marker once the
  alias was read back. A marker still there means the process died or failed in between:
  if the alias points at the marker's version the move happened (the marker is cleared,
  the version tagged `promoted`, the descriptions rewritten); otherwise it never did and
  its record is removed (`settled_history`, pure).
- **A move made by hand** (below).

Either way the BentoML store then mirrors the alias: entries labelled champion of another
version are deleted, and the alias's version is imported if it has none.

Champion moves made outside imgcls (MLflow's UI, a script): noticed, then recorded.

Anyone with write access to the registered model can set or delete the champion alias by
hand: the gate is bypassed and no history is written, so the history no longer ends at
the champion. `manual_move` is the pure comparison of the two. `reconcile` writes
the missing record, under the registry lock, as a move of action `manual` by
`unknown (outside imgcls)`. Only commands that write anyway call it (pipeline, `models
promote`, `models rollback`, before they plan); `models list` and `show` merely show a
pending one, so a user who may only read can still run them.

In the lineage a manual move counts as a promotion (`rollback` then goes back to the
champion before it); a removal of the alias ends the lineage. A recorded hand move also
updates the BentoML store like a promotion (not a removal: the store keeps the last
champion). One noticed only under the lock of a move in progress (made while that move's
gate ran) is recorded there without a BentoML copy: the store lags until the next command.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime

from mlflow import MlflowClient

from imgcls.settings import TrackingSettings
from registry.gate import gate_subset
from registry.history import (
    AliasMove,
    clear_in_flight,
    forget_move,
    history_from_tags,
    in_flight,
    model_tags,
    move_key,
    record_move,
)
from registry.lock import Held, interrupts_deferred, registry_lock
from registry.register import set_status
from registry.settings import RegistrySettings
from registry.versions import STATUS_TAG, champion_version, get_version, version_metrics

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


def settled_history(moves: list[AliasMove], marker: dict | None, champion: str | None) -> list[AliasMove]:
    """The history without the record of a move left in flight whose alias never moved."""
    if marker is None or champion == marker["to"]:
        return moves
    return [m for m in moves if m.seq != marker["seq"]]


def pending_manual_move(client: MlflowClient, settings: RegistrySettings) -> AliasMove | None:
    """A move made by hand that the history does not show yet (reads only)."""
    tags = model_tags(client, settings)
    champion = champion_version(client, settings)
    moves = settled_history(history_from_tags(tags), in_flight(tags), champion)
    return manual_move(moves, champion, settings.gate_metric)


def reconcile(client: MlflowClient, tracking: TrackingSettings, settings: RegistrySettings) -> None:
    """Make the history, the status tags and the BentoML store agree with the alias.

    Reads first; the lock is taken only when something disagrees, and the alias's version
    is downloaded (outside the lock) only when the BentoML store lacks it.
    """
    tags = model_tags(client, settings)
    champion = champion_version(client, settings)
    moves = settled_history(history_from_tags(tags), in_flight(tags), champion)
    strays, missing = bento_drift(settings, champion)
    drift = (
        in_flight(tags) is not None
        or manual_move(moves, champion, settings.gate_metric) is not None
        or strays
        or missing
        or (champion is not None and _status(client, settings, champion) != "promoted")
    )
    if not drift:
        return
    with contextlib.ExitStack() as stack:
        download = _download(stack, settings, champion if missing else None)
        held = stack.enter_context(registry_lock(client, tracking, settings))
        reconcile_locked(client, settings, held, download, bento=True)


def reconcile_locked(
    client: MlflowClient, settings: RegistrySettings, held: Held | None = None, download=None, bento=False
) -> AliasMove | None:
    """Holding the lock: settle a move left in flight, record a hand move, tag the champion
    `promoted` and (with `bento`) mirror it in the BentoML store; returns a hand move recorded."""
    settle_in_flight(client, settings, held)
    move = record_if_moved_by_hand(client, settings, held)
    champion = champion_version(client, settings)
    if champion is not None and _status(client, settings, champion) != "promoted":
        _after_record(client, settings, None, champion)
    if bento and settings.bento_import and champion is not None:
        _mirror_in_bento(settings, champion, download)
    return move


def settle_in_flight(client: MlflowClient, settings: RegistrySettings, held: Held | None = None) -> None:
    """A move marked in flight: keep its record if the alias points at it, else remove it."""
    marker = in_flight(model_tags(client, settings))
    if marker is None:
        return
    champion = champion_version(client, settings)
    with interrupts_deferred():
        if held is not None:
            held.check()
        if champion != marker["to"]:
            stub = AliasMove(action="promote", from_version=marker["from"], to_version=marker["to"],
                             metric=settings.gate_metric, reason="")  # fmt: skip
            with contextlib.suppress(Exception):  # the record may never have been written
                forget_move(client, settings, stub, move_key(marker["seq"]))
        clear_in_flight(client, settings)
    happened = champion == marker["to"]
    log.warning(
        "a move to version %s (record %s) was left half-done: %s",
        marker["to"],
        marker["seq"],
        "the alias moved, so it stands" if happened else "the alias never moved, so its record is removed",
    )
    if happened:
        _after_record(client, settings, None, champion)


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
    _after_record(client, settings, move, move.to_version)
    if download is not None and download.version == move.to_version:
        _mirror_in_bento(settings, move.to_version, download)
    return move


def bento_drift(settings: RegistrySettings, champion: str | None) -> tuple[list[str], bool]:
    """(tags of entries labelled champion that are not the alias's version, whether the
    alias's version has no labelled entry); nothing when import is off or there is no champion."""
    if not settings.bento_import or champion is None:
        return [], False
    from service.store import VERSION_LABEL, champion_entries

    entries = champion_entries(settings.bento_model_name, settings.alias, settings.model_name)
    strays = [str(m.tag) for m in entries if m.info.labels.get(VERSION_LABEL) != champion]
    return strays, len(strays) == len(entries)


def _status(client: MlflowClient, settings: RegistrySettings, version: str) -> str | None:
    return get_version(client, settings, version).tags.get(STATUS_TAG)


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


def _mirror_in_bento(settings: RegistrySettings, champion: str, download=None) -> None:
    """Label the champion's entry (saved from `download` if it has none) and delete the others."""
    from registry.bento import retire_earlier_champions, save_champion

    strays, missing = bento_drift(settings, champion)
    try:
        if missing and download is not None and download.version == champion:
            keep = save_champion(settings, download)
        elif not missing:
            from service.store import champion_entries

            entries = champion_entries(settings.bento_model_name, settings.alias, settings.model_name)
            keep = next(str(m.tag) for m in entries if str(m.tag) not in strays)
        else:
            log.warning("version %s is %s but not in the BentoML store", champion, settings.alias)
            return
        retire_earlier_champions(settings, keep=keep)
    except Exception:  # noqa: BLE001 - bookkeeping after the record
        log.warning("version %s: the BentoML store was not brought in line", champion, exc_info=True)


def _figures(client: MlflowClient, settings: RegistrySettings, version: str | None) -> dict[str, float]:
    if version is None:
        return {}
    try:
        return gate_subset(version_metrics(client, settings, version))
    except Exception:  # noqa: BLE001 - a record without figures beats no record
        log.warning("no metrics for version %s", version, exc_info=True)
        return {}


def _after_record(client: MlflowClient, settings: RegistrySettings, move: AliasMove | None, version) -> None:
    """Bookkeeping once the history agrees with the alias: the status tag and the descriptions."""
    from registry.describe import describe_after_move, describe_model

    if version is not None:
        try:
            set_status(client, settings, version, "promoted")
        except Exception:  # noqa: BLE001 - the alias and the record are the truth
            log.warning("version %s: status tag not written", version, exc_info=True)
    if move is not None:
        describe_after_move(client, settings, move)
    else:
        describe_model(client, settings)
