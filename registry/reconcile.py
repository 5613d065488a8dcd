"""The alias is the truth: what must change so the history, the status tags and the BentoML
store agree with it, after a hand move or a promotion that died half-way. Pure: a plan over
the `Snapshot` that `registry.steps.read_snapshot` reads; `registry.steps.repair` carries it
out with the promotion's own executor.

- **A move that never finished**: its in-flight marker (`imgcls.move_in_flight`) is still
  there. If the alias points at the marker's version the move happened (the marker goes, the
  version is tagged `promoted`, the descriptions rewritten); otherwise its record goes too.
- **A move made by hand** (MLflow's UI, a script; no gate, no history): the history no
  longer ends at the alias (`manual_move`). It is recorded as a move of action `manual` by
  `unknown (outside imgcls)`; in the lineage it counts as a promotion, and a removal of the
  alias ends the lineage. Only writing commands repair; `models list` and `show` show it.
- **BentoML** mirrors the alias: other entries labelled champion are retired, and the
  alias's version is imported if it has none (not after a removal: the store keeps the last).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from registry.history import AliasMove

OUTSIDE = "unknown (outside imgcls)"
MOVED = "alias moved outside the gate"
REMOVED = "alias removed outside the gate"


@dataclass(frozen=True)
class Snapshot:
    """The registry as one read saw it; two snapshots are equal if nothing moved between them.

    The fields that do not take part in the comparison are what reconcile needs besides.
    """

    champion: str | None
    history_length: int
    pending: tuple[str | None, str | None] | None = None  # a hand move not recorded: (from, to)
    in_flight: int | None = None  # the record of a move whose alias change is not confirmed
    lineage: tuple[str, ...] = field(default=(), compare=False)
    in_flight_move: tuple[str | None, str | None] | None = field(default=None, compare=False)  # (from, to)
    status: str | None = field(default=None, compare=False)  # the champion's status tag
    # (entry tag, registry version) of the BentoML entries labelled champion; None: not read
    bento: tuple[tuple[str, str | None], ...] | None = field(default=None, compare=False)

    @property
    def settled(self) -> bool:
        """Whether the history agrees with the alias (no move in flight, no hand move)."""
        return self.pending is None and self.in_flight is None


@dataclass(frozen=True)
class Settle:
    """Move `seq` was left in flight: keep its record if it `happened`, else remove it."""

    seq: int
    from_version: str | None
    to_version: str | None
    happened: bool


@dataclass(frozen=True)
class RecordHandMove:
    """The alias was moved (or removed, `to_version` None) outside imgcls: record it."""

    from_version: str | None
    to_version: str | None


@dataclass(frozen=True)
class MarkPromoted:
    """The champion's status tag says otherwise: tag it `promoted`."""

    version: str


@dataclass(frozen=True)
class MirrorBento:
    """Label `version` champion in BentoML (`keep`: its entry; None: import it), retire the rest."""

    version: str
    keep: str | None


Repair = Settle | RecordHandMove | MarkPromoted | MirrorBento


def reconcile(snapshot: Snapshot) -> tuple[Repair, ...]:
    """What to repair so everything agrees with the alias, in order; empty when it does. Pure."""
    repairs: list[Repair] = []
    champion = snapshot.champion
    if snapshot.in_flight is not None:
        old, new = snapshot.in_flight_move or (None, None)
        repairs.append(Settle(snapshot.in_flight, old, new, happened=champion == new))
    if snapshot.pending is not None:  # below the marker: a half-done move is no hand move
        repairs.append(RecordHandMove(*snapshot.pending))
    tagged = snapshot.pending is not None or any(isinstance(r, Settle) and r.happened for r in repairs)
    if champion is not None and snapshot.status != "promoted" and not tagged:
        repairs.append(MarkPromoted(champion))
    mirror = _bento_repair(snapshot)
    return (*repairs, mirror) if mirror else tuple(repairs)


def _bento_repair(snapshot: Snapshot) -> MirrorBento | None:
    if snapshot.bento is None or snapshot.champion is None:
        return None
    mine = [tag for tag, version in snapshot.bento if version == snapshot.champion]
    if mine and len(mine) == len(snapshot.bento):
        return None
    return MirrorBento(snapshot.champion, keep=mine[0] if mine else None)


def manual_move(
    moves: list[AliasMove], champion: str | None, metric: str, at: str | None = None
) -> AliasMove | None:
    """The move that explains `champion` when the history ends elsewhere; None if it agrees.

    `at` is when the move was noticed (default: now): MLflow keeps no time for an alias.
    """
    recorded = moves[-1].to_version if moves else None  # where the history left the alias
    if champion == recorded:
        return None
    return hand_move(recorded, champion, metric, at)


def hand_move(
    from_version: str | None, to_version: str | None, metric: str, at: str | None = None
) -> AliasMove:
    """The record of a move made outside imgcls, from `from_version` to `to_version` (None: removed)."""
    return AliasMove(
        at=at or datetime.now(UTC).isoformat(timespec="seconds"),
        action="manual",
        from_version=from_version,
        to_version=to_version,
        metric=metric,
        reason=MOVED if to_version is not None else REMOVED,
        by=OUTSIDE,
    )


def settled_history(moves: list[AliasMove], marker: dict | None, champion: str | None) -> list[AliasMove]:
    """The history without the record of a move left in flight whose alias never moved."""
    if marker is None or champion == marker["to"]:
        return moves
    return [m for m in moves if m.seq != marker["seq"]]
