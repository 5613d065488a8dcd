"""The gate run for real, and the champion alias moves: promote, force, roll back.

Order of a promotion: evaluate candidate and champion on the candidate's held-out images
-> take the registry lock -> re-read the champion (compare-and-set: if it changed while
the gate ran, run the gate again against the new one) -> import into BentoML -> write the
history record and move the alias with Ctrl-C held back. Nothing moves if a step fails.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from mlflow import MlflowClient

from imgcls.settings import TrackingSettings
from registry.gate import GateDecision, class_mismatch, decide, gate_metrics
from registry.history import AliasMove, champion_lineage, read_history, write_history
from registry.lock import interrupts_deferred, registry_lock
from registry.register import (
    RegistryError,
    champion_version,
    get_version,
    load_version_model,
    set_status,
    version_card,
)
from registry.settings import RegistrySettings
from training.data import DatasetScan
from training.evaluate import Evaluation

log = logging.getLogger(__name__)

# Images per batch when the gate re-runs models on the test split.
EVAL_BATCH_SIZE = 32


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
    champion = champion_version(client, settings)
    if candidate == champion:
        return GateDecision(
            candidate, champion, settings.gate_metric, False, f"version {candidate} is already the champion"
        )
    decision = run_gate(settings, candidate, scan, champion, candidate_eval)
    if decision.passed:
        decision = commit_if_unchanged(client, tracking, settings, decision, scan, candidate_eval)
    if not decision.passed:
        set_status(client, settings, candidate, "rejected")
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
    """Under the lock: move the alias if the champion is still the one the gate compared
    against; otherwise run the gate again against the new champion first."""
    log.info("gate passed against champion %s; taking the registry lock", decision.champion_version)
    with registry_lock(client, tracking, settings):
        current = champion_version(client, settings)
        if current != decision.champion_version:
            log.info(
                "champion changed from %s to %s while the gate ran: gating again",
                decision.champion_version,
                current,
            )
            decision = run_gate(settings, decision.candidate_version, scan, current, candidate_eval)
            decision.regated = True
        if decision.passed:
            move_alias(client, settings, _promotion(decision, forced=False, reason=decision.reason))
    return decision


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


def move_alias(client: MlflowClient, settings: RegistrySettings, move: AliasMove) -> None:
    """Import into BentoML, record the move, then move the alias; call holding the lock.

    The record is taken back if the alias cannot be set, so the history never shows a
    move that did not happen.
    """
    if settings.bento_import:
        from registry.bento import import_champion

        import_champion(settings, move.to_version)
    with interrupts_deferred():
        moves = read_history(client, settings)
        write_history(client, settings, [*moves, move])
        try:
            client.set_registered_model_alias(settings.model_name, settings.alias, move.to_version)
        except BaseException:
            write_history(client, settings, moves)
            raise
        set_status(client, settings, move.to_version, "promoted")
    log.info("%s -> version %s (%s from %s)", settings.alias, move.to_version, move.action, move.from_version)


def force_promote(
    client: MlflowClient,
    tracking: TrackingSettings,
    settings: RegistrySettings,
    candidate: str,
    reason: str,
    scan: DatasetScan | None,
) -> GateDecision:
    """Make `candidate` champion whatever the gate says; the gate's verdict is recorded with
    the reason when the test images are still there to run it."""
    if not reason or not reason.strip():
        raise RegistryError("--force needs --reason: say why the gate is overridden")
    get_version(client, settings, candidate)
    with registry_lock(client, tracking, settings):
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
        move_alias(client, settings, _promotion(decision, forced=True, reason=recorded))
    decision.passed, decision.reason = True, f"forced: {recorded}"
    return decision


def rollback(
    client: MlflowClient, tracking: TrackingSettings, settings: RegistrySettings, reason: str
) -> AliasMove:
    """Move the champion alias back to the champion before the current one (from the history)."""
    with registry_lock(client, tracking, settings):
        moves = read_history(client, settings)
        lineage = champion_lineage(moves)
        current = champion_version(client, settings)
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
        move = AliasMove(
            action="rollback",
            from_version=current,
            to_version=target,
            metric=settings.gate_metric,
            candidate_metrics=_tagged_metrics(client, settings, target),
            champion_metrics=_tagged_metrics(client, settings, current),
            reason=reason,
        )
        move_alias(client, settings, move)
    return move


def _tagged_metrics(client: MlflowClient, settings: RegistrySettings, version: str) -> dict[str, float]:
    tags = get_version(client, settings, version).tags
    metrics = {k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")}
    return {k: v for k, v in metrics.items() if k in ("accuracy", "macro_f1") or k.startswith("recall_")}
