"""Readable Markdown descriptions for the MLflow UI: the registered model's page and each version's.

The model's description says what it classifies, which version is champion and how it
scored, and shows a table of the last alias moves (who, when, why, the gate's figures).
A version's description is its card: backbone, head, input size, classes, test accuracy,
macro-F1, ECE and NLL at its temperature, the weakest classes, why it was or was not promoted, and a link to its run.

MLflow stores both in `String(5000)` columns (PostgreSQL enforces it), so every text is
cut to `MAX_CHARS`: older table rows go first, then long class lists are shortened.
Descriptions are bookkeeping: `describe_*` log a failure and never raise, so writing
one can never undo or misreport an alias move.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from mlflow import MlflowClient

from registry.history import AliasMove, moves_of, read_history
from registry.settings import RegistrySettings
from registry.versions import STATUS_TAG, champion_version, get_version, held_out_metrics

log = logging.getLogger(__name__)

# Under MLflow's String(5000) description columns, with room for a multi-byte surprise.
MAX_CHARS = 4900
MODEL_MOVES = 20  # rows of the model's moves table before the cap drops older ones
VERSION_MOVES = 10  # rows of a version's own moves
WEAKEST = 5  # classes listed as the weakest by recall
CLASS_LIST_CHARS = 600  # the class list is cut to this ("... and N more")
NAME_CHARS = 40  # one class name, user or metric name in a table cell
REASON_CHARS = 80  # a move's reason in a table row
VERDICT_CHARS = 600  # the gate's reason on a version's card
UNREAD = object()  # a `champion` argument not given: the alias is read


@dataclass
class VersionFacts:
    """What a card shows about one version, read from its tags and its run."""

    version: str
    status: str = "-"
    backbone: str = "-"
    image_size: str = "-"
    class_names: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    experiment_id: str | None = None
    dataset: str | None = None
    temperature: str = "1"  # T of its probabilities (training/calibrate.py); 1 on older versions
    head: str = "-"  # the classifier on the backbone, in words; "-" on older versions


def read_facts(client: MlflowClient, settings: RegistrySettings, version: str) -> VersionFacts:
    """A version's facts: its tags, and its run's held-out metrics and experiment."""
    v = get_version(client, settings, version)
    run = client.get_run(v.run_id) if v.run_id else None
    return VersionFacts(
        version=str(v.version),
        status=v.tags.get(STATUS_TAG, "-"),
        backbone=v.tags.get("backbone", "-"),
        head=v.tags.get("head", "-"),
        image_size=v.tags.get("image_size", "-"),
        class_names=json.loads(v.tags.get("class_names", "[]")),
        metrics=held_out_metrics(v.tags, run.data.metrics if run else {}),
        run_id=v.run_id,
        experiment_id=run.info.experiment_id if run else None,
        dataset=v.tags.get("dataset.fingerprint"),
        temperature=v.tags.get("temperature", "1"),
    )


# ----- the texts (pure) -------------------------------------------------------------------


def model_description(
    name: str,
    alias: str,
    champion: VersionFacts | None,
    moves: list[AliasMove],
    about: VersionFacts | None = None,
    limit: int = MAX_CHARS,
) -> str:
    """The registered model's Markdown: what it classifies, the champion, the last moves.

    `about` describes the classes when there is no champion (e.g. the newest version).
    """
    facts = champion or about
    head = [f"# {_md(name)}", ""]
    if facts is not None:
        head += [_classifies(facts), ""]
    head += [_champion_line(alias, champion, moves), ""]
    return _fit(
        lambda rows: "\n".join(head + _moves_table("Last alias moves", moves, rows)), MODEL_MOVES, limit
    )


def version_description(
    name: str,
    alias: str,
    facts: VersionFacts,
    champion: str | None,
    moves: list[AliasMove],
    why: str | None = None,
    limit: int = MAX_CHARS,
) -> str:
    """A version's card in Markdown; `moves` are this version's alias moves, `why` the gate's reason."""
    now = f", {_md(alias)} now" if champion == facts.version else ""
    head = [
        # Plain first line: the version list's Description column shows it as text.
        f"{_md(facts.backbone)} {_md(facts.image_size)}, {len(facts.class_names)} classes: test accuracy "
        f"{_num(facts.metrics.get('accuracy'))}, macro-F1 {_num(facts.metrics.get('macro_f1'))} "
        f"({_md(facts.status)}{now})",
        "",
        f"## Version {facts.version} of {_md(name)}",
        "",
        f"Status: **{_md(facts.status)}**" + (f" · **{_md(alias)} now**" if now else ""),
        "",
        "| | |",
        "|---|---|",
        f"| backbone | {_md(facts.backbone)} |",
        f"| head | {_md(facts.head)} |",
        f"| input size | {_md(facts.image_size)} px, raw RGB 0-255 |",
        f"| classes | {len(facts.class_names)}: {class_list(facts.class_names)} |",
        f"| test accuracy | {_num(facts.metrics.get('accuracy'))} |",
        f"| test macro-F1 | {_num(facts.metrics.get('macro_f1'))} |",
        f"| test ECE / NLL (calibration) | {_num(facts.metrics.get('ece'))} / {_num(facts.metrics.get('nll'))} "
        f"at temperature {_md(facts.temperature)} |",
        f"| weakest classes (recall) | {weakest_classes(facts) or '-'} |",
        f"| dataset fingerprint | {_md(facts.dataset or '-')} |",
        f"| run | {_run_link(facts)} |",
        "",
        f"**Promotion:** {_md(verdict(facts, moves, why), VERDICT_CHARS)}",
        "",
    ]
    return _fit(lambda rows: "\n".join(head + _moves_table("Alias moves", moves, rows)), VERSION_MOVES, limit)


def class_list(names: list[str], budget: int = CLASS_LIST_CHARS) -> str:
    """Class names, comma-separated, cut to about `budget` characters ("... and N more")."""
    shown: list[str] = []
    used = 0
    for name in names:
        item = _md(name, NAME_CHARS)
        if shown and used + len(item) + 2 > budget:
            break
        shown.append(item)
        used += len(item) + 2
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" ... and {more} more" if more else "")


def weakest_classes(facts: VersionFacts, count: int = WEAKEST) -> str:
    """The `count` classes with the lowest test recall, lowest first: "cat 0.62, dog 0.71"."""
    from training.evaluate import metric_safe

    recalls = {
        n: facts.metrics[f"recall_{metric_safe(n)}"]
        for n in facts.class_names
        if f"recall_{metric_safe(n)}" in facts.metrics
    }
    lowest = sorted(recalls, key=recalls.get)[:count]
    return ", ".join(f"{_md(n, NAME_CHARS)} {recalls[n]:.4f}" for n in lowest)


def verdict(facts: VersionFacts, moves: list[AliasMove], why: str | None = None) -> str:
    """Why this version is or is not champion, in a sentence."""
    made = [m for m in moves if m.to_version == facts.version]
    if why and facts.status == "rejected":
        return f"not promoted: {why}"
    if made:
        last = made[-1]
        how = {"promote": "forced promotion" if last.forced else "the gate", "rollback": "a rollback"}
        return f"made champion by {how.get(last.action, 'a move outside the gate')} ({_when(last.at)}): {last.reason}"
    if why:
        return why
    return {
        "candidate": "not gated yet",
        "rejected": "not promoted: the gate kept the champion",
        "interrupted": "its pipeline was interrupted before the gate decided; never champion",
        "failed": "its pipeline failed before the gate decided; never champion",
    }.get(facts.status, "never champion")


def _classifies(facts: VersionFacts) -> str:
    return (
        f"Classifies images into **{len(facts.class_names)} classes**: {class_list(facts.class_names)}. "
        f"Backbone {_md(facts.backbone)}, input {_md(facts.image_size)} px (raw RGB 0-255)."
    )


def _champion_line(alias: str, champion: VersionFacts | None, moves: list[AliasMove]) -> str:
    if champion is None:
        removed = moves and moves[-1].to_version is None
        return f"**No {_md(alias)}**" + (" (the alias was removed outside the gate)." if removed else " yet.")
    line = f"**{_md(alias.capitalize())}: version {champion.version}**"
    if moves and moves[-1].to_version == champion.version:
        last = moves[-1]
        line += f" since {_when(last.at)} ({last.action} by {_md(last.by, NAME_CHARS)})"
    scores = f"test accuracy {_num(champion.metrics.get('accuracy'))}, macro-F1 {_num(champion.metrics.get('macro_f1'))}"
    return f"{line}: {scores}. Run: {_run_link(champion)}."


def _moves_table(title: str, moves: list[AliasMove], rows: int) -> list[str]:
    if not moves:
        return [f"### {title}", "", "none yet"]
    shown = list(reversed(moves))[:rows]
    lines = [
        f"### {title} (newest first)",
        "",
        "| # | when (UTC) | action | from → to | by | gate: candidate vs champion | worst recall drop | reason |",
        "|--:|---|---|---|---|---|---|---|",
    ]
    lines += [_move_row(m) for m in shown]
    if len(shown) < len(moves):
        lines += [
            "",
            f"{len(moves) - len(shown)} older moves: `imgcls models list`, tags `imgcls.promotion.*`.",
        ]
    return lines


def _move_row(m: AliasMove) -> str:
    action = f"{m.action} (forced)" if m.forced else m.action
    worst = m.worst_recall_drop()
    cells = [
        str(m.seq or "-"),
        _when(m.at),
        action,
        f"{m.from_version or '-'} → {m.to_version or '(none)'}",
        _md(m.by, NAME_CHARS),
        _figures(m),
        f"{_md(worst[0], NAME_CHARS)} {worst[1]:.4f}" if worst else "-",
        _md(m.reason, REASON_CHARS),
    ]
    return "| " + " | ".join(cells) + " |"


def _figures(m: AliasMove) -> str:
    new, old = m.candidate_metrics.get(m.metric), m.champion_metrics.get(m.metric)
    if new is None:
        return "-"
    return f"{_md(m.metric, NAME_CHARS)} {new:.4f}" + (f" vs {old:.4f}" if old is not None else "")


def _run_link(facts: VersionFacts) -> str:
    if not facts.run_id:
        return "-"
    if not facts.experiment_id:
        return _md(facts.run_id)
    # The relative link MLflow's own UI uses (hash routing), so it works behind any host.
    return f"[{facts.run_id[:8]}](#/experiments/{facts.experiment_id}/runs/{facts.run_id})"


def _fit(render: Callable[[int], str], rows: int, limit: int) -> str:
    """`render(rows)` with as many table rows as fit in `limit` characters (older rows go first)."""
    for n in range(rows, -1, -1):
        text = render(n)
        if len(text) <= limit:
            return text
    return text[: limit - 3] + "..."  # only a pathological header gets here


def _md(text: str, limit: int | None = None) -> str:
    """`text` on one line, cut to `limit`, safe inside Markdown and a table cell."""
    text = " ".join(str(text).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    text = re.sub(r"([\\`*\[\]|#])", r"\\\1", text)
    # GitHub flavour leaves mid-word underscores alone (macro_f1); only edges can emphasise.
    text = re.sub(r"(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])", r"\\_", text)
    # MLflow renders with showdown's GitHub flavour: "@name" would become a GitHub link.
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("@", "&#64;")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _when(at: str) -> str:
    return at[:16].replace("T", " ")


# ----- writing them (I/O; never raises) ---------------------------------------------------


def describe_version(
    client: MlflowClient, settings: RegistrySettings, version: str, why: str | None = None, champion=UNREAD
) -> None:
    """Write `version`'s card as its description; a failure is logged, never raised.

    `champion`: the alias's version when the caller knows it (else the alias is read)."""
    try:
        facts = read_facts(client, settings, version)
        moves = moves_of(read_history(client, settings), facts.version)
        champion = champion_version(client, settings) if champion is UNREAD else champion
        text = version_description(settings.model_name, settings.alias, facts, champion, moves, why)
        client.update_model_version(settings.model_name, facts.version, description=text)
    except Exception:  # noqa: BLE001 - bookkeeping: the registry's state is already decided
        log.warning("version %s: its description could not be written", version, exc_info=True)


def describe_model(client: MlflowClient, settings: RegistrySettings, champion=UNREAD) -> None:
    """Write the registered model's description; a failure is logged, never raised.

    `champion`: the alias's version when the caller knows it (else the alias is read)."""
    try:
        moves = read_history(client, settings)
        champion = champion_version(client, settings) if champion is UNREAD else champion
        facts = read_facts(client, settings, champion) if champion else None
        about = None if facts else _newest(client, settings)
        text = model_description(settings.model_name, settings.alias, facts, moves, about)
        client.update_registered_model(settings.model_name, description=text)
    except Exception:  # noqa: BLE001 - bookkeeping: the alias has already moved
        log.warning("%s: the model's description could not be written", settings.model_name, exc_info=True)


def describe_after_move(client: MlflowClient, settings: RegistrySettings, move: AliasMove) -> None:
    """After an alias move to `move.to_version`: the model's description, and the card of the
    version it left. (The new champion's card is rewritten by its status change.)
    """
    describe_model(client, settings, move.to_version)
    if move.from_version is not None and move.from_version != move.to_version:
        describe_version(client, settings, move.from_version, champion=move.to_version)


def _newest(client: MlflowClient, settings: RegistrySettings) -> VersionFacts | None:
    versions = client.search_model_versions(f"name = '{settings.model_name}'")
    if not versions:
        return None
    return read_facts(client, settings, str(max(int(v.version) for v in versions)))
