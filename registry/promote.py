"""The three ways the champion alias moves: promote through the gate, force, roll back.

Each states its intent against a snapshot of the registry and hands it to the promotion
sequence in `registry/steps.py` (observe, plan, act, record), which reconciles first,
plans purely, moves the alias under the lock and settles what a crash leaves behind. The
gate's evaluations run here, outside the lock, once per champion they are compared with.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mlflow import MlflowClient

from imgcls.settings import TrackingSettings
from registry import steps
from registry.gate import class_mismatch, gate_subset
from registry.history import AliasMove, read_history
from registry.lock import Held
from registry.register import set_status
from registry.settings import RegistrySettings
from registry.steps import Force, GateEvidence, Outcome, Promote, Rollback, Snapshot
from registry.versions import RegistryError, get_version, load_version_model, version_card, version_metrics
from training.data import DatasetScan
from training.evaluate import Evaluation

log = logging.getLogger(__name__)

# Images per batch when the gate re-runs models on the test split.
EVAL_BATCH_SIZE = 32


def evaluate_version(settings: RegistrySettings, version: str, scan: DatasetScan) -> Evaluation:
    """Run a registered version over the test split of `scan`, at the version's own input size."""
    from imgcls.settings import TrackingSettings
    from training.data import load_split, split_view
    from training.evaluate import evaluate_model

    model, card = load_version_model(settings, version)
    # Under IMGCLS_HOME/tmp like training's split images, swept if a killed gate left them.
    with split_view(TrackingSettings().home) as view:
        dataset = load_split(scan, "test", Path(view), tuple(card.image_size), EVAL_BATCH_SIZE)
        return evaluate_model(model, dataset, card.class_names)


class Evaluations:
    """The gate's evidence for one candidate against whichever champion a snapshot shows;
    the candidate is evaluated once (or given), each champion once."""

    def __init__(self, settings: RegistrySettings, candidate: str, scan: DatasetScan | None, given=None):
        self.settings, self.candidate, self.scan = settings, candidate, scan
        self._candidate_eval: Evaluation | None = given
        self._champions: dict[str, GateEvidence] = {}

    def against(self, snapshot: Snapshot) -> GateEvidence:
        champion = snapshot.champion
        if self.scan is None or self.candidate == champion:
            return GateEvidence(champion, None)
        if self._candidate_eval is None:
            self._candidate_eval = evaluate_version(self.settings, self.candidate, self.scan)
        if champion is None:
            return GateEvidence(None, self._candidate_eval)
        if champion not in self._champions:
            theirs = version_card(self.settings, champion).class_names
            mismatch = class_mismatch(self.scan.class_names, theirs)
            against = None if mismatch else evaluate_version(self.settings, champion, self.scan)
            self._champions[champion] = GateEvidence(champion, self._candidate_eval, against, mismatch)
        return self._champions[champion]


def promote_if_better(
    client: MlflowClient,
    tracking: TrackingSettings,
    settings: RegistrySettings,
    candidate: str,
    scan: DatasetScan,
    candidate_eval: Evaluation | None = None,
) -> Outcome:
    """Gate `candidate` against the current champion and move the alias if it passes.

    The version is tagged `promoted` or `rejected`; the alias never moves on a rejection.
    """
    gate = Evaluations(settings, candidate, scan, candidate_eval)
    outcome = steps.run(client, tracking, settings, lambda snap: Promote(candidate, gate.against(snap)))
    if not outcome.passed and outcome.champion_version != candidate:
        set_status(client, settings, candidate, "rejected", outcome.reason, outcome.champion_version)
    log.info("version %s %s: %s", candidate, "promoted" if outcome.passed else "not promoted", outcome.reason)
    return outcome


def force_promote(
    client: MlflowClient,
    tracking: TrackingSettings,
    settings: RegistrySettings,
    candidate: str,
    reason: str,
    scan: DatasetScan | None,
) -> Outcome:
    """Make `candidate` champion whatever the gate says; the gate's verdict is recorded with
    the reason when the test images are still there to run it (outside the lock)."""
    if not reason or not reason.strip():
        raise RegistryError("--force needs --reason: say why the gate is overridden")
    get_version(client, settings, candidate)
    gate = Evaluations(settings, candidate, scan)
    outcome = steps.run(client, tracking, settings, lambda snap: Force(candidate, reason, gate.against(snap)))
    if not outcome.passed:
        raise RegistryError(outcome.reason)
    return outcome


def rollback(
    client: MlflowClient, tracking: TrackingSettings, settings: RegistrySettings, reason: str
) -> AliasMove:
    """Move the champion alias back to the champion before the current one (from the history)."""

    def intent(snapshot: Snapshot) -> Rollback:
        figures = {v: _tagged_metrics(client, settings, v) for v in snapshot.lineage[-2:]}
        return Rollback(reason, figures)

    outcome = steps.run(client, tracking, settings, intent)
    if not outcome.passed:
        raise RegistryError(outcome.reason)
    return outcome.move


def move_alias(
    client: MlflowClient, settings: RegistrySettings, move: AliasMove, held: Held | None = None, download=None
) -> bool:
    """Record `move` and set the alias as it says, unplanned (scripts, tests); call holding the
    lock. Returns whether Ctrl-C/SIGTERM arrived meanwhile (the move completed first)."""
    seq = len(read_history(client, settings)) + 1
    return steps.record(client, settings, move, seq, held, download).interrupted


def _tagged_metrics(client: MlflowClient, settings: RegistrySettings, version: str) -> dict[str, float]:
    return gate_subset(version_metrics(client, settings, version))
