"""Tables of the registry for the terminal: versions, one version, the alias history."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from mlflow import MlflowClient

from registry.history import AliasMove, move_details, moves_of, read_history
from registry.settings import RegistrySettings
from registry.versions import STATUS_TAG, champion_version, get_version

# Alias moves shown under `models list`; `models show` lists all of a version's moves.
RECENT_MOVES = 10


def print_versions(client: MlflowClient, settings: RegistrySettings) -> None:
    """Every version (newest first) with its key metrics, then the recent alias moves."""
    from rich.console import Console
    from rich.table import Table

    versions = client.search_model_versions(f"name = '{settings.model_name}'")
    console = Console()
    if not versions:
        console.print(f"no versions of {settings.model_name} registered yet")
        return
    champion = champion_version(client, settings)
    table = Table(title=f"{settings.model_name} ({settings.alias}: version {champion or 'none'})")
    columns = ("version", settings.alias, "status", "created", "backbone", "accuracy", "macro_f1", "ece", "nll",
               "run")  # fmt: skip
    for column in columns:
        table.add_column(column, overflow="fold")
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        table.add_row(
            str(v.version),
            "*" if str(v.version) == champion else "",
            v.tags.get(STATUS_TAG, "-"),
            _when(v.creation_timestamp),
            v.tags.get("backbone", "-"),
            _metric(v.tags.get("metric.accuracy")),
            _metric(v.tags.get("metric.macro_f1")),
            _metric(v.tags.get("metric.ece")),
            _metric(v.tags.get("metric.nll")),
            (v.run_id or "-")[:8],
        )
    console.print(table)
    moves = read_history(client, settings)
    pending = _pending_manual_move(console, moves, champion, settings)
    print_history(moves[-RECENT_MOVES:] + pending, f"last {RECENT_MOVES} alias moves")


def _pending_manual_move(console, moves: list[AliasMove], champion: str | None, settings) -> list[AliasMove]:
    """A move made by hand that is not recorded yet: said, and shown as the last row.

    Only writing commands record it (under the registry lock); a report only reads, so
    users who may only read the registry can run it.
    """
    from registry.reconcile import manual_move

    move = manual_move(moves, champion, settings.gate_metric)
    if move is None:
        return []
    console.print(
        f"note: {settings.alias} was moved outside imgcls (history: {move.from_version or 'none'}, "
        f"alias: {move.to_version or 'none'}); the next pipeline, promote or rollback records it",
        markup=False,
    )
    move.action, move.at = "manual", "not recorded yet"
    return [move]


def print_version(client: MlflowClient, settings: RegistrySettings, version: str) -> None:
    """One version: where it came from, its run's metrics, its tags and its alias moves."""
    from rich.console import Console
    from rich.table import Table

    v = get_version(client, settings, version)
    champion = champion_version(client, settings)
    console = Console()
    console.print(
        f"[bold]{settings.model_name} version {v.version}[/bold]"
        + (f"  ({settings.alias})" if str(v.version) == champion else "")
    )
    console.print(
        f"run: {v.run_id}\nsource: {v.source}\ncreated: {_when(v.creation_timestamp)}", markup=False
    )
    metrics = client.get_run(v.run_id).data.metrics if v.run_id else {}
    table = Table(title="run metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in sorted(metrics):
        table.add_row(name, f"{metrics[name]:.4f}")
    console.print(table)
    tags = Table(title="tags")
    tags.add_column("tag")
    tags.add_column("value")
    for key in sorted(k for k in v.tags if not k.startswith("metric.")):
        tags.add_row(key, _short(v.tags[key]))
    console.print(tags)
    history = read_history(client, settings)
    pending = _pending_manual_move(console, history, champion, settings)
    moves = [move_details(client, settings, m) for m in moves_of(history + pending, str(v.version))]
    print_history(moves, f"alias moves of version {v.version}")


def print_history(moves: list[AliasMove], title: str) -> None:
    """The alias moves, oldest first: when, from, to, metrics compared, forced, why."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("when", "action", "from", "to", "compared", "worst recall drop", "forced", "reason"):
        table.add_column(column)
    for m in moves:
        worst = m.worst_recall_drop()
        table.add_row(
            m.at,
            m.action,
            m.from_version or "-",
            m.to_version or "(none)",
            _compared(m),
            f"{worst[0]} {worst[1]:.4f}" if worst else "-",
            "yes" if m.forced else "no",
            m.reason,
        )
    Console().print(table if moves else f"{title}: none yet")


def _compared(move: AliasMove) -> str:
    new, old = move.candidate_metrics.get(move.metric), move.champion_metrics.get(move.metric)
    if new is None:
        return "-"
    return f"{move.metric} {new:.4f}" + (f" vs {old:.4f}" if old is not None else "")


def _metric(value: str | None) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def _when(millis: int | None) -> str:
    if not millis:
        return "-"
    return datetime.fromtimestamp(millis / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def _short(value: str) -> str:
    try:
        return json.dumps(json.loads(value)) if value.startswith("[") else value
    except ValueError:
        return value
