"""The promotion sequence, one step after another: observe, plan, act, record.

    observe        one read: a frozen Snapshot (champion, history, hand move, move in flight,
                   the champion's status, its BentoML entries); if reconcile.py's pure plan finds
                   drift, it is repaired under the lock and the registry read again
    plan           pure: plan(snapshot, intent) -> Move | Refusal; the gate decides inside it
    download       the new champion's model for BentoML, outside the lock, kept across retries
    lock           the registry lock, with MLflow's retries and timeouts bounded while it is held
                   (then read the snapshot again: `Stale` if it moved or had drift, and start over)
    record_history mark the move in flight, then write its record
    move_alias     the alias; if the write fails, read the alias before undoing anything
    read_back      the write's answer says the alias moved: clear the in-flight marker
    label_bento    only now label the new BentoML entry champion
    retire         delete the entries of earlier champions
    mark_promoted  the version's status tag
    describe       the MLflow UI's descriptions

Each step starts with `hook("promote_<step>")` (imgcls/hooks.py), so a test can make it fail,
hang or SIGKILL the process there. A fault before the alias moved leaves the alias where it
was; one after it never undoes or misreports the move: the alias is the truth, and the next
command's `reconcile` brings the history, the status tags and the BentoML store in line.
The executor (`record`, `repair`, `_after_move`) carries out both a planned move and those
repairs, and the alias is read twice per move: by the snapshot it is planned on and by the
one under the lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from mlflow import MlflowClient

from imgcls.hooks import hook
from imgcls.settings import TrackingSettings
from registry.bento import champion_labels, downloaded, retire_earlier_champions, save_champion
from registry.describe import describe_after_move, describe_model
from registry.gate import decide, gate_metrics, gate_subset
from registry.history import (
    AliasMove,
    champion_lineage,
    clear_in_flight,
    forget_move,
    history_from_tags,
    in_flight,
    mark_in_flight,
    model_tags,
    move_key,
    record_move,
)
from registry.lock import Held, interrupts_deferred, registry_lock
from registry.reconcile import (
    MarkPromoted,
    MirrorBento,
    RecordHandMove,
    Repair,
    Settle,
    Snapshot,
    hand_move,
    manual_move,
    reconcile,
    settled_history,
)
from registry.register import set_status
from registry.settings import RegistrySettings
from registry.versions import STATUS_TAG, champion_version, get_version, version_metrics
from training.evaluate import Evaluation

log = logging.getLogger(__name__)

# Times the champion may change under a waiting promotion before it gives up: each change
# is another pipeline's completed move, so more than this means a stampede, not progress.
MAX_ATTEMPTS = 5
STEPS = ("observe", "evaluate", "download", "lock", "record_history", "move_alias", "read_back",
         "label_bento", "retire", "mark_promoted", "describe")  # fmt: skip


# --- the types: what was seen, what is wanted, what to do, what happened --------------------


@dataclass(frozen=True)
class GateEvidence:
    """The gate's evaluations, on the candidate's test images, against champion `against`."""

    against: str | None
    candidate: Evaluation | None  # None: the test images are not available
    champion: Evaluation | None = None
    mismatch: str | None = None  # why the two cannot be compared (other classes)


@dataclass(frozen=True)
class Promote:
    candidate: str
    evidence: GateEvidence


@dataclass(frozen=True)
class Force:
    candidate: str
    reason: str
    evidence: GateEvidence


@dataclass(frozen=True)
class Rollback:
    reason: str
    figures: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # version -> metrics


Intent = Promote | Force | Rollback


@dataclass(frozen=True)
class Verdict:
    """What the gate said, and on which numbers."""

    passed: bool
    reason: str
    candidate_metrics: Mapping[str, float] = field(default_factory=dict)
    champion_metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Move:
    move: AliasMove
    verdict: Verdict


@dataclass(frozen=True)
class Refusal:
    reason: str
    verdict: Verdict | None = None
    error: bool = False  # a request that cannot be carried out (force/rollback), not a gate "no"


@dataclass(frozen=True)
class Stale:
    """The registry moved between the plan and the lock (`now`: as read under the lock)."""

    now: Snapshot


@dataclass(frozen=True)
class Outcome:
    """How a promotion, forced promotion or rollback ended. `passed`: the alias moved."""

    candidate_version: str | None
    champion_version: str | None
    metric: str
    passed: bool
    reason: str
    candidate_metrics: Mapping[str, float] = field(default_factory=dict)
    champion_metrics: Mapping[str, float] = field(default_factory=dict)
    regated: bool = False  # the champion changed while the gate ran, so it ran again
    interrupted: bool = False  # Ctrl-C/SIGTERM arrived during the move, which completed first
    error: bool = False  # refused as a request that cannot be carried out
    move: AliasMove | None = None


# --- the sequence ------------------------------------------------------------------------


def run(
    client: MlflowClient,
    tracking: TrackingSettings,
    settings: RegistrySettings,
    intent_for: Callable[[Snapshot], Intent],
) -> Outcome:
    """Observe (and reconcile) -> plan -> download -> act, again while the champion moves.

    `intent_for(snapshot)` states the intent against that snapshot (the gate's evaluations
    happen there, outside the lock).
    """
    with contextlib.ExitStack() as downloads:
        fetched: dict[str, object] = {}
        for attempt in range(MAX_ATTEMPTS):
            snapshot = observe(client, tracking, settings, downloads, fetched)
            hook("promote_evaluate")
            intent = intent_for(snapshot)
            decision = plan(snapshot, intent, settings)
            if isinstance(decision, Refusal):
                return _refused(snapshot, intent, decision, settings, regated=attempt > 0)
            download = _download(downloads, fetched, settings, decision.move.to_version)
            log.info("%s planned against champion %s; taking the registry lock", decision.move.action,
                     snapshot.champion)  # fmt: skip
            acted = act(client, tracking, settings, snapshot, decision.move, download)
            if isinstance(acted, Stale):
                log.info("champion changed from %s to %s meanwhile: planning again", snapshot.champion,
                         acted.now.champion)  # fmt: skip
                continue
            return _moved(decision, acted, regated=attempt > 0)
    reason = f"the champion changed {MAX_ATTEMPTS} times meanwhile; try again"
    return Outcome(_candidate(intent), snapshot.champion, settings.gate_metric, False, reason, error=True)


def observe(
    client: MlflowClient, tracking: TrackingSettings, settings: RegistrySettings, downloads, fetched: dict
) -> Snapshot:
    """One read of the registry and the BentoML store; drift it shows (reconcile's plan) is
    repaired under the lock first, and the registry read again."""
    hook("promote_observe")
    snapshot = read_snapshot(client, settings, bento=True)
    repairs = reconcile(snapshot)
    if not repairs:
        return snapshot
    download = _download_for(downloads, fetched, settings, repairs)
    with registry_lock(client, tracking, settings) as held:
        repair(client, settings, reconcile(read_snapshot(client, settings, bento=True)), held, download)
    return read_snapshot(client, settings)


def read_snapshot(client: MlflowClient, settings: RegistrySettings, bento: bool = False) -> Snapshot:
    """The Snapshot: the registered model's tags, the alias, the champion's status tag and
    (with `bento`, when import is on) its BentoML entries. The one place the registry is read."""
    tags = model_tags(client, settings)
    champion = champion_version(client, settings)
    marker, moves = in_flight(tags), history_from_tags(tags)
    settled = settled_history(moves, marker, champion)
    hand = manual_move(settled, champion, settings.gate_metric)
    return Snapshot(
        champion=champion,
        history_length=len(moves),
        pending=None if hand is None else (hand.from_version, hand.to_version),
        in_flight=None if marker is None else marker["seq"],
        lineage=tuple(champion_lineage(settled + ([hand] if hand else []))),
        in_flight_move=None if marker is None else (marker["from"], marker["to"]),
        status=None if champion is None else get_version(client, settings, champion).tags.get(STATUS_TAG),
        bento=champion_labels(settings) if bento and settings.bento_import else None,
    )


def plan(snapshot: Snapshot, intent: Intent, settings: RegistrySettings) -> Move | Refusal:
    """What to do about `intent` given `snapshot`: pure, no I/O."""
    if isinstance(intent, Rollback):
        return _plan_rollback(snapshot, intent, settings)
    if intent.candidate == snapshot.champion:
        return Refusal(f"version {intent.candidate} is already the champion", error=isinstance(intent, Force))
    verdict = gate_verdict(intent.evidence, settings)
    if isinstance(intent, Promote):
        if not verdict.passed:
            return Refusal(verdict.reason, verdict)
        return Move(_alias_move(snapshot, intent.candidate, verdict, settings, verdict.reason), verdict)
    recorded = f"{intent.reason} (gate: {verdict.reason})"
    forced = Verdict(True, f"forced: {recorded}", verdict.candidate_metrics, verdict.champion_metrics)
    return Move(_alias_move(snapshot, intent.candidate, verdict, settings, recorded, forced=True), forced)


def gate_verdict(evidence: GateEvidence, settings: RegistrySettings) -> Verdict:
    """The gate's decision on `evidence` (pure: the evaluations were made beforehand)."""
    if evidence.candidate is None:
        return Verdict(False, "not run: test images unavailable")
    candidate = gate_metrics(evidence.candidate)
    if evidence.mismatch:
        return Verdict(False, evidence.mismatch, candidate)
    passed, reason = decide(evidence.candidate, evidence.champion, settings)
    champion = gate_metrics(evidence.champion) if evidence.champion is not None else {}
    return Verdict(passed, reason, candidate, champion)


def act(
    client: MlflowClient,
    tracking: TrackingSettings,
    settings: RegistrySettings,
    expected: Snapshot,
    move: AliasMove,
    download=None,
) -> Moved | Stale:
    """Compare-and-set: under the lock, re-read; if the registry is still `expected`, record.

    Drift found there is repaired first (without BentoML); a hand move or a half-done move
    counts as a change."""
    hook("promote_lock")
    with bounded_requests(settings), registry_lock(client, tracking, settings) as held:
        now = read_snapshot(client, settings)
        repair(client, settings, reconcile(now), held)
        if now != expected or not now.settled:
            return Stale(now)
        return record(client, settings, move, expected.history_length + 1, held, download)


@dataclass(frozen=True)
class Moved:
    """The alias moved; `interrupted`: a signal was held back meanwhile."""

    interrupted: bool


def record(
    client: MlflowClient,
    settings: RegistrySettings,
    move: AliasMove,
    seq: int,
    held: Held | None = None,
    download=None,
) -> Moved:
    """History, then alias, then clear the marker; then the bookkeeping. Call holding the lock.

    Ctrl-C/SIGTERM are held back meanwhile (the move completes and is reported). If the
    alias write fails, the alias is read first: only if it did not move are the record and
    its marker taken back; if it cannot be read, they stay for the next command to settle.
    """
    with interrupts_deferred() as signals:
        if held is not None:
            held.check()  # a lost remote lease must not write
        hook("promote_record_history")
        mark_in_flight(client, settings, move, seq)
        key = record_move(client, settings, move, seq)
        _move_alias(client, settings, move, key)
        confirmed = _read_back(client, settings, move)
        mirror = MirrorBento(move.to_version, keep=None) if confirmed and download is not None else None
        _after_move(client, settings, move.to_version, move, mirror, download)
    log.info("%s -> version %s (%s from %s)", settings.alias, move.to_version, move.action, move.from_version)
    if signals:
        log.warning("an interrupt arrived during the alias move; the move completed first and stands")
    return Moved(bool(signals))


def _move_alias(client: MlflowClient, settings: RegistrySettings, move: AliasMove, key: str) -> None:
    try:
        hook("promote_move_alias")
        client.set_registered_model_alias(settings.model_name, settings.alias, move.to_version)
    except Exception:
        now = _alias_or_unknown(client, settings)
        if now == move.to_version:  # the write landed, its answer was lost: the move stands
            log.warning("the alias write reported an error, but %s is version %s", settings.alias, now)
            return
        if now is _UNKNOWN:
            log.error("the alias cannot be read: record %s is left for the next command to settle", key)
        else:
            _take_back(client, settings, move, key)
        raise


def _read_back(client: MlflowClient, settings: RegistrySettings, move: AliasMove) -> bool:
    """The in-flight marker goes: the alias is `move.to_version` (the write answered without
    an error, and MLflow answers once it is committed, or the alias was read after an error).
    Whether that worked; if not, the next command settles the move."""
    try:
        hook("promote_read_back")
        clear_in_flight(client, settings)
    except Exception:  # noqa: BLE001 - the write succeeded: the move stands, the next command settles
        log.warning("version %s is %s, but its move stays marked in flight; the next command settles it",
                    move.to_version, settings.alias, exc_info=True)  # fmt: skip
        return False
    return True


def _take_back(client: MlflowClient, settings: RegistrySettings, move: AliasMove, key: str) -> None:
    try:
        forget_move(client, settings, key, move.to_version)
        clear_in_flight(client, settings)
    except Exception:  # noqa: BLE001 - keep the alias error; the next command settles the rest
        log.error("the alias did not move; its record %s is left for the next command to remove", key)


def repair(
    client: MlflowClient, settings: RegistrySettings, repairs: tuple[Repair, ...], held: Held | None = None,
    download=None,
) -> None:  # fmt: skip
    """Carry out reconcile's repairs in order, holding the lock (`download`: a model for
    BentoML, used by a `MirrorBento` of its version that has no entry)."""
    for step in repairs:
        if isinstance(step, Settle):
            _settle(client, settings, step, held)
        elif isinstance(step, RecordHandMove):
            _record_hand_move(client, settings, step, held)
        elif isinstance(step, MarkPromoted):
            _after_move(client, settings, step.version)
        else:
            _mirror(settings, step, download)


def _settle(client: MlflowClient, settings: RegistrySettings, settle: Settle, held: Held | None) -> None:
    with interrupts_deferred():
        if held is not None:
            held.check()
        if not settle.happened:
            with contextlib.suppress(Exception):  # the record may never have been written
                forget_move(client, settings, move_key(settle.seq), settle.to_version)
        clear_in_flight(client, settings)
    log.warning("a move to version %s (record %s) was left half-done: %s", settle.to_version, settle.seq,
                "the alias moved, so it stands" if settle.happened else
                "the alias never moved, so its record is removed")  # fmt: skip
    if settle.happened:
        _after_move(client, settings, settle.to_version)


def _record_hand_move(client: MlflowClient, settings: RegistrySettings, hand: RecordHandMove, held) -> None:
    move = hand_move(hand.from_version, hand.to_version, settings.gate_metric)
    move.candidate_metrics = _figures(client, settings, move.to_version)
    move.champion_metrics = _figures(client, settings, move.from_version)
    with interrupts_deferred():
        if held is not None:
            held.check()
        record_move(client, settings, move)
    log.warning("%s was moved outside imgcls: version %s -> %s; recorded as move %s", settings.alias,
                move.from_version, move.to_version, move.seq)  # fmt: skip
    _after_move(client, settings, move.to_version, move)


def _after_move(
    client: MlflowClient, settings: RegistrySettings, champion: str | None, move: AliasMove | None = None,
    mirror: MirrorBento | None = None, download=None,
) -> None:  # fmt: skip
    """The bookkeeping once the history and the alias agree that `champion` is champion
    (`move`: the move that made it so, if one was just recorded); none of it raises."""
    if mirror is not None:
        _mirror(settings, mirror, download)
    if champion is not None:
        _bookkeeping("mark_promoted", set_status, client, settings, champion, "promoted", None, champion)
    if move is not None:
        _bookkeeping("describe", describe_after_move, client, settings, move)
    else:
        _bookkeeping("describe", describe_model, client, settings, champion)


def _mirror(settings: RegistrySettings, mirror: MirrorBento, download=None) -> None:
    """Label the champion's BentoML entry (saved from `download` if it has none), retire the rest."""
    keep = mirror.keep
    if keep is None and download is not None and download.version == mirror.version:
        keep = _bookkeeping("label_bento", save_champion, settings, download)
    if keep is None:
        log.warning("version %s is %s but not in the BentoML store", mirror.version, settings.alias)
        return
    _bookkeeping("retire", retire_earlier_champions, settings, keep)


def _bookkeeping(step: str, action: Callable, *args):
    """A step after the alias moved: its failure is logged, never raised (the alias is the truth)."""
    try:
        hook(f"promote_{step}")
        return action(*args)
    except Exception:  # noqa: BLE001 - the next command reconciles what this left undone
        log.warning("after the alias moved, step %s failed; the next command reconciles it", step,
                    exc_info=True)  # fmt: skip
        return None


def _figures(client: MlflowClient, settings: RegistrySettings, version: str | None) -> dict[str, float]:
    if version is None:
        return {}
    try:
        return gate_subset(version_metrics(client, settings, version))
    except Exception:  # noqa: BLE001 - a record without figures beats no record
        log.warning("no metrics for version %s", version, exc_info=True)
        return {}


# MLflow reads these for every request (rest_utils.http_request; sessions are cached per
# value), so setting them around the locked section bounds its requests and no others.
# 5 s, one retry, no back-off: a hung server fails a write in ~10 s, not MLflow's default
# 7 retries x 120 s (about 20 minutes) with the lock held. A healthy server answers in ms.
LOCKED_REQUESTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
}


@contextlib.contextmanager
def bounded_requests(settings: RegistrySettings | None = None) -> Iterator[None]:
    """MLflow's HTTP timeout and retries bounded for the block, restored after it.

    They are process-wide environment variables: other threads see them meanwhile.
    """
    values = dict(LOCKED_REQUESTS)
    if settings is not None:
        values["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(settings.locked_request_timeout_s)
        values["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(settings.locked_request_retries)
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


# --- small helpers ---------------------------------------------------------------------


_UNKNOWN = object()


def _alias_or_unknown(client: MlflowClient, settings: RegistrySettings):
    try:
        return champion_version(client, settings)
    except Exception:  # noqa: BLE001 - the caller must not undo what it cannot see
        return _UNKNOWN


def _download(stack: contextlib.ExitStack, fetched: dict, settings: RegistrySettings, version: str | None):
    """The version's model for BentoML, fetched once per sequence (None when import is off)."""
    if not settings.bento_import or version is None:
        return None
    if version not in fetched:
        hook("promote_download")
        fetched[version] = stack.enter_context(downloaded(settings, version))
    return fetched[version]


def _download_for(stack: contextlib.ExitStack, fetched: dict, settings: RegistrySettings, repairs):
    """The model a `MirrorBento` without an entry needs, or None (also when it cannot be
    fetched, e.g. its files are gone: the record matters more than the copy)."""
    version = next((r.version for r in repairs if isinstance(r, MirrorBento) and r.keep is None), None)
    try:
        return _download(stack, fetched, settings, version)
    except Exception:  # noqa: BLE001 - logged; the store stays behind until the files are back
        log.warning("version %s could not be downloaded for the BentoML store", version, exc_info=True)
        return None


def _alias_move(snapshot: Snapshot, candidate: str, verdict: Verdict, settings, reason: str, forced=False):
    return AliasMove(
        action="promote",
        from_version=snapshot.champion,
        to_version=candidate,
        metric=settings.gate_metric,
        candidate_metrics=dict(verdict.candidate_metrics),
        champion_metrics=dict(verdict.champion_metrics),
        reason=reason,
        forced=forced,
    )


def _plan_rollback(snapshot: Snapshot, intent: Rollback, settings: RegistrySettings) -> Move | Refusal:
    current, lineage = snapshot.champion, snapshot.lineage
    if current is None:
        return Refusal(f"{settings.model_name} has no {settings.alias}: nothing to roll back", error=True)
    if not lineage or lineage[-1] != current:
        return Refusal(f"the recorded history does not end at the current champion ({current}); "
                       "use `models promote N --force`", error=True)  # fmt: skip
    if len(lineage) < 2:
        return Refusal(f"version {current} is the first champion: there is no previous champion to roll "
                       "back to", error=True)  # fmt: skip
    target = lineage[-2]
    back = AliasMove(
        action="rollback",
        from_version=current,
        to_version=target,
        metric=settings.gate_metric,
        candidate_metrics=dict(intent.figures.get(target, {})),
        champion_metrics=dict(intent.figures.get(current, {})),
        reason=intent.reason,
    )
    return Move(back, Verdict(True, intent.reason, back.candidate_metrics, back.champion_metrics))


def _candidate(intent: Intent) -> str | None:
    return None if isinstance(intent, Rollback) else intent.candidate


def _refused(snapshot: Snapshot, intent: Intent, refusal: Refusal, settings, regated: bool) -> Outcome:
    verdict = refusal.verdict or Verdict(False, refusal.reason)
    return Outcome(_candidate(intent), snapshot.champion, settings.gate_metric, False, refusal.reason,
                   verdict.candidate_metrics, verdict.champion_metrics, regated, error=refusal.error)  # fmt: skip


def _moved(decision: Move, moved: Moved, regated: bool) -> Outcome:
    move, verdict = decision.move, decision.verdict
    return Outcome(move.to_version, move.from_version, move.metric, True, verdict.reason,
                   verdict.candidate_metrics, verdict.champion_metrics, regated, moved.interrupted,
                   move=move)  # fmt: skip
