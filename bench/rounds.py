"""Servers alternated in rounds: each round runs the same sequence of concurrency levels
against every server in turn, so a slow spell of a shared machine falls on all of them
alike, and a level that follows a burst shows what the burst left behind.

    targets = [Target("imgcls", send, requests), Target("litserve", ...)]
    rows = run_rounds(targets, rounds=3, levels=(1, 32, 1, 128, 1), cap_s=60)

Each row is bench.loadgen.run_level's, plus `server`, `round` (1, 2, ...) and `step`
(the level's place in the sequence, 1, 2, ...: the second c=1 is step 3). A target with
`only` runs just those levels; a `reference` (the model in process, at c=1) runs just
before each such level of every target, or of each target its own (a mapping: the model
with the engine that server computes with).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from bench import loadgen

# Low load, a burst, low load after it, a bigger burst, low load after that (issue 10).
ROUND_LEVELS = (1, 32, 1, 128, 1)


@dataclass(frozen=True)
class Target:
    """One server under test: its load (an HTTP one, or the model in process), the
    requests of a level, and what to read from it per level (bench.loadgen.run_level)."""

    name: str
    send: loadgen.Http | loadgen.Sender
    requests: Callable[[int], int]
    cpu: Callable[[], dict[str, float]] | None = None
    probe: Callable[[], dict] | None = None
    server_side: Callable[[dict, dict], dict] | None = None
    only: frozenset[int] | None = None  # the concurrency levels it runs (None: all)
    # hold(True) stops the server while another is measured, hold(False) resumes it: for
    # servers whose idle workers poll (LitServe's take ~10% of a core each, doing nothing).
    hold: Callable[[bool], None] | None = None


def run_rounds(
    targets: Sequence[Target],
    rounds: int,
    levels: Sequence[int],
    cap_s: float,
    stop: threading.Event | None = None,
    reference: Target | Mapping[str, Target] | None = None,
) -> list[dict]:
    """`rounds` times: every target, in order, through every level of `levels`.

    `reference` (the model itself in process; a mapping: target name -> its own, a target
    missing from it has none) runs just before each level of its `only` of every target,
    its row marked `before` = that target: a figure taken moments before the one it is
    compared with, after the same bursts."""
    rows = []
    for number in range(1, rounds + 1):
        for target in targets:
            own = reference.get(target.name) if isinstance(reference, Mapping) else reference
            with _alone(target, targets):
                for step, concurrency in enumerate(levels, 1):
                    mark = {"round": number, "step": step}
                    if own is not None and concurrency in (own.only or ()):
                        rows.append(_measure(own, concurrency, cap_s, stop) | mark | {"before": target.name})
                    if target.only is None or concurrency in target.only:
                        rows.append(_measure(target, concurrency, cap_s, stop) | mark)
    return rows


@contextlib.contextmanager
def _alone(target: Target, targets: Sequence[Target]):
    """The other targets that can be held are stopped while `target` is measured."""
    held = [t for t in targets if t is not target and t.hold is not None]
    for other in held:
        other.hold(True)
    try:
        yield
    finally:
        for other in held:
            other.hold(False)


def _measure(target: Target, concurrency: int, cap_s: float, stop: threading.Event | None) -> dict:
    row = loadgen.run_level(target.send, target.requests(concurrency), concurrency, cap_s, stop,
                            target.probe, target.cpu, target.server_side)  # fmt: skip
    print(f"    {target.name} c={concurrency}: {row['images_per_s']:.1f} images/s, "
          f"p50 {_ms(row['p50_ms'])} ms, {row['errors']} errors", flush=True)  # fmt: skip
    return row | {"server": target.name}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
