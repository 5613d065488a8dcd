"""The gate run for real, and the champion alias moves: promote, force, roll back.

Order of a promotion: evaluate candidate and champion on the candidate's held-out images
-> download the candidate for BentoML -> take the registry lock -> re-read the champion
(compare-and-set: if it changed while the gate ran, release the lock, run the gate again
against the new one and start over) -> save into BentoML, write the history record and
move the alias with Ctrl-C held back. The slow work (evaluations, downloads) is never done
under the lock. Nothing moves if a step fails, and a failure after the alias moved never
makes the outcome look unpromoted.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from imgcls.settings import TrackingSettings
from registry.describe import describe_after_move
from registry.gate import GateDecision, class_mismatch, decide, gate_metrics, gate_subset
from registry.history import AliasMove, champion_lineage, forget_move, read_history, record_move
from registry.lock import Held, interrupts_deferred, registry_lock
from registry.reconcile import record_if_moved_by_hand, record_manual_move
from registry.register import (
    RegistryError,
    champion_version,
    get_version,
    load_version_model,
    set_status,
    version_card,
    version_metrics,
)
from registry.settings import RegistrySettings
from training.data import DatasetScan
from training.evaluate import Evaluation

log = logging.getLogger(__name__)

# Images per batch when the gate re-runs models on the test split.
EVAL_BATCH_SIZE = 32
# Times the champion may change under a waiting promotion before it gives up: each change
# is another pipeline's completed move, so more than this means a stampede, not progress.
MAX_ATTEMPTS = 5


def evaluate_version(settings: RegistrySettings, version: str, scan: DatasetScan) -> Evaluation:
    """Run a registered version over the test split of `scan`, at the version's own input size."""
    from training.data import load_split
    from training.evaluate import evaluate_model

    model, card = load_version_model(settings, version)
    with tempfile.TemporaryDirectory(prefix="imgcls-gate-") as view:
        dataset = load_split(scan, "test", Path(view), tuple(card.image_size), EVAL_BATCH_SIZE)
        return evaluate_model(model, dataset, card.class_names)


def run_gate(
    settings: RegistrySettings,
    candidate: str,
    scan: DatasetScan,
    champion: str | None,
    candidate_eval: Evaluation | None = None,
) -> GateDecision:
    """Evaluate the candidate (unless given) and the champion on the same images; decide."""
    if candidate == champion:
        return GateDecision(
            candidate, champion, settings.gate_metric, False, f"version {candidate} is the champion"
        )
    candidate_eval = candidate_eval or evaluate_version(settings, candidate, scan)
    decision = GateDecision(
        candidate, champion, settings.gate_metric, False, "", gate_metrics(candidate_eval)
    )
    champion_eval = None
    if champion is not None:
        mismatch = class_mismatch(scan.class_names, version_card(settings, champion).class_names)
        if mismatch:
            decision.reason = mismatch
            return decision
        champion_eval = evaluate_version(settings, champion, scan)
        decision.champion_metrics = gate_metrics(champion_eval)
    decision.passed, decision.reason = decide(candidate_eval, champion_eval, settings)
    return decision


def promote_if_better(
    client: MlflowClient,
    tracking: TrackingSettings,
    settings: RegistrySettings,
    candidate: str,
    scan: DatasetScan,
    candidate_eval: Evaluation | None = None,
) -> GateDecision:
    """Gate `candidate` against the current champion and move the alias if it passes.

    The version is tagged `promoted` or `rejected`; the alias never moves on a rejection.
    """
    record_manual_move(client, tracking, settings)
    champion = champion_version(client, settings)
    if candidate == champion:
        return GateDecision(
            candidate, champion, settings.gate_metric, False, f"version {candidate} is already the champion"
        )
    decision = run_gate(settings, candidate, scan, champion, candidate_eval)
    if decision.passed:
        decision = commit_if_unchanged(client, tracking, settings, decision, scan, candidate_eval)
    if not decision.passed:
        set_status(client, settings, candidate, "rejected", decision.reason)
    log.info(
        "version %s %s: %s", candidate, "promoted" if decision.passed else "not promoted", decision.reason
    )
    return decision


def commit_if_unchanged(
    client: MlflowClient,
    tracking: TrackingSettings,
    settings: RegistrySettings,
    decision: GateDecision,
    scan: DatasetScan,
    candidate_eval: Evaluation | None = None,
) -> GateDecision:
    """Move the alias if the champion is still the one the gate compared against (checked
    under the lock); if it changed, gate again against the new one outside the lock, retry."""
    for _ in range(MAX_ATTEMPTS):
        if not decision.passed:
            return decision
        log.info("gate passed against champion %s; taking the registry lock", decision.champion_version)
        move = _promotion(decision, forced=False, reason=decision.reason)
        outcome = move_if_champion_is(client, tracking, settings, decision.champion_version, move)
        if outcome.moved:
            decision.interrupted = outcome.interrupted
            return decision
        log.info(
            "champion changed from %s to %s while the gate ran: gating again",
            decision.champion_version,
            outcome.champion,
        )
        decision = run_gate(settings, decision.candidate_version, scan, outcome.champion, candidate_eval)
        decision.regated = True
    decision.passed = False
    decision.reason = f"the champion changed {MAX_ATTEMPTS} times while this candidate was gated; try again"
    return decision


@dataclass
class MoveOutcome:
    """Whether the alias moved, the champion found under the lock, and whether Ctrl-C or
    SIGTERM arrived during the move (it was completed first, and stands)."""

    moved: bool
    champion: str | None
    interrupted: bool = False


def move_if_champion_is(
    client: MlflowClient,
    tracking: TrackingSettings,
    settings: RegistrySettings,
    expected: str | None,
    move: AliasMove,
    expected_moves: int | None = None,
) -> MoveOutcome:
    """Compare-and-set: download `move.to_version` for BentoML, then under the lock move the
    alias if the champion is still `expected` (and the history still has `expected_moves`)."""
    with (
        _bento_download(settings, move.to_version) as download,
        registry_lock(client, tracking, settings) as held,
    ):
        record_if_moved_by_hand(client, settings, held)  # a hand move counts as a change
        current = champion_version(client, settings)
        if current != expected or (
            expected_moves is not None and len(read_history(client, settings)) != expected_moves
        ):
            return MoveOutcome(False, current)
        interrupted = move_alias(client, settings, move, held, download)
        return MoveOutcome(True, move.to_version, interrupted)


def _bento_download(settings: RegistrySettings, version: str):
    if not settings.bento_import:
        return contextlib.nullcontext()
    from registry.bento import downloaded

    return downloaded(settings, version)


def _promotion(decision: GateDecision, forced: bool, reason: str) -> AliasMove:
    return AliasMove(
        action="promote",
        from_version=decision.champion_version,
        to_version=decision.candidate_version,
        metric=decision.metric,
        candidate_metrics=decision.candidate_metrics,
        champion_metrics=decision.champion_metrics,
        reason=reason,
        forced=forced,
    )


def move_alias(
    client: MlflowClient,
    settings: RegistrySettings,
    move: AliasMove,
    held: Held | None = None,
    download=None,
) -> bool:
    """Save into BentoML, record the move, then move the alias; call holding the lock.

    Ctrl-C/SIGTERM are held back meanwhile; returns whether one arrived (the move was
    completed and stands). If anything fails before the alias moved, the record and the
    BentoML entry are taken back, so neither shows a move that did not happen.
    """
    with interrupts_deferred() as signals:
        if held is not None:
            held.check()  # a lost remote lease must not write
        tag = _save_to_bento(settings, download)
        try:
            key = record_move(client, settings, move)
            try:
                client.set_registered_model_alias(settings.model_name, settings.alias, move.to_version)
            except BaseException:
                _take_back(client, settings, move, key)
                raise
        except BaseException:
            if tag is not None:
                from registry.bento import remove_entry

                remove_entry(tag)
            raise
        _after_move(client, settings, move, tag)
    if signals:
        log.warning(
            "an interrupt arrived during the alias move; the move completed first and stands: "
            "version %s is %s",
            move.to_version,
            settings.alias,
        )
    return bool(signals)


def _take_back(client: MlflowClient, settings: RegistrySettings, move: AliasMove, key: str) -> None:
    try:
        forget_move(client, settings, move, key)
    except Exception:  # noqa: BLE001 - keep the alias error; say what is left behind
        log.error("the alias did not move, but its history record %s could not be removed", key)


def _save_to_bento(settings: RegistrySettings, download) -> str | None:
    if download is None:
        return None
    from registry.bento import save_champion

    return save_champion(settings, download)


def _after_move(client: MlflowClient, settings: RegistrySettings, move: AliasMove, tag: str | None) -> None:
    """Bookkeeping once the alias has moved: never undoes or misreports the move."""
    log.info("%s -> version %s (%s from %s)", settings.alias, move.to_version, move.action, move.from_version)
    try:
        set_status(client, settings, move.to_version, "promoted")
    except Exception:  # noqa: BLE001 - the alias is the truth; the status tag only mirrors it
        log.warning(
            "version %s is %s, but its status tag could not be written",
            move.to_version,
            settings.alias,
            exc_info=True,
        )
    describe_after_move(client, settings, move)
    if tag is not None:
        from registry.bento import retire_earlier_champions

        retire_earlier_champions(settings, keep=tag)


def force_promote(
    client: MlflowClient,
    tracking: TrackingSettings,
    settings: RegistrySettings,
    candidate: str,
    reason: str,
    scan: DatasetScan | None,
) -> GateDecision:
    """Make `candidate` champion whatever the gate says; the gate's verdict is recorded with
    the reason when the test images are still there to run it (outside the lock)."""
    if not reason or not reason.strip():
        raise RegistryError("--force needs --reason: say why the gate is overridden")
    get_version(client, settings, candidate)
    record_manual_move(client, tracking, settings)
    for _ in range(MAX_ATTEMPTS):
        current = champion_version(client, settings)
        if candidate == current:
            raise RegistryError(f"version {candidate} is already the champion")
        if scan is not None:
            decision = run_gate(settings, candidate, scan, current)
        else:
            decision = GateDecision(
                candidate, current, settings.gate_metric, False, "not run: test images unavailable"
            )
        recorded = f"{reason} (gate: {decision.reason})"
        outcome = move_if_champion_is(
            client, tracking, settings, current, _promotion(decision, forced=True, reason=recorded)
        )
        if outcome.moved:
            decision.passed, decision.reason = True, f"forced: {recorded}"
            decision.interrupted = outcome.interrupted
            return decision
    raise RegistryError(f"the champion changed {MAX_ATTEMPTS} times meanwhile; try again")


def rollback(
    client: MlflowClient, tracking: TrackingSettings, settings: RegistrySettings, reason: str
) -> AliasMove:
    """Move the champion alias back to the champion before the current one (from the history)."""
    record_manual_move(client, tracking, settings)
    for _ in range(MAX_ATTEMPTS):
        moves = read_history(client, settings)
        current = champion_version(client, settings)
        move = _rollback_move(client, settings, moves, current, reason)
        if move_if_champion_is(client, tracking, settings, current, move, len(moves)).moved:
            return move
    raise RegistryError(f"the champion changed {MAX_ATTEMPTS} times meanwhile; try again")


def _rollback_move(
    client: MlflowClient, settings: RegistrySettings, moves: list[AliasMove], current: str | None, reason: str
) -> AliasMove:
    lineage = champion_lineage(moves)
    if current is None:
        raise RegistryError(f"{settings.model_name} has no {settings.alias}: nothing to roll back")
    if not lineage or lineage[-1] != current:
        raise RegistryError(
            f"the recorded history does not end at the current champion ({current}); use `models promote N --force`"
        )
    if len(lineage) < 2:
        raise RegistryError(
            f"version {current} is the first champion: there is no previous champion to roll back to"
        )
    target = lineage[-2]
    return AliasMove(
        action="rollback",
        from_version=current,
        to_version=target,
        metric=settings.gate_metric,
        candidate_metrics=_tagged_metrics(client, settings, target),
        champion_metrics=_tagged_metrics(client, settings, current),
        reason=reason,
    )


def _tagged_metrics(client: MlflowClient, settings: RegistrySettings, version: str) -> dict[str, float]:
    return gate_subset(version_metrics(client, settings, version))
