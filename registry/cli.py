"""`imgcls pipeline`, `imgcls models ...` and `imgcls ui`: the command-line edge of the registry.

Exit codes of `pipeline` and `models promote`: 0 = a new champion was promoted, 3 = the
candidate is registered but the gate kept the champion, 2 = bad input (config, dataset,
unknown version, --force without --reason), 1 = any other error, 130 = interrupted.
"""

from __future__ import annotations

import argparse
import logging
import signal

from imgcls.redact import redact_text
from registry.pipeline import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_NOT_PROMOTED, EXIT_PROMOTED

log = logging.getLogger(__name__)

EXIT_CODES_HELP = (
    f"exit codes: {EXIT_PROMOTED} = new champion promoted, {EXIT_NOT_PROMOTED} = registered but not "
    f"promoted, {EXIT_BAD_INPUT} = bad input, {EXIT_ERROR} = other error, {EXIT_INTERRUPTED} = interrupted"
)


def register(subparsers) -> None:
    """Add `imgcls pipeline`, `imgcls models` and `imgcls ui`."""
    _add_pipeline(subparsers)
    _add_models(subparsers)
    _add_ui(subparsers)


def _add_pipeline(subparsers) -> None:
    from training.cli import add_train_arguments

    parser = subparsers.add_parser(
        "pipeline",
        help="retrain: validate -> train -> evaluate -> register -> gate -> promote",
        description="Train with the same options and config file as `imgcls train`, register the model "
        "and make it champion only if it beats the current one. " + EXIT_CODES_HELP,
        epilog="The gate is set by IMGCLS_REGISTRY_* variables (GATE_METRIC, MARGIN, MAX_RECALL_DROP, "
        "FIRST_MODEL_FLOOR); MLFLOW_TRACKING_URI is honoured.",
    )
    add_train_arguments(parser)
    parser.set_defaults(func=run_pipeline_command)


def _add_models(subparsers) -> None:
    models = subparsers.add_parser(
        "models", help="list, inspect, promote and roll back registered versions", description=EXIT_CODES_HELP
    )
    sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    sub.add_parser(
        "list", help="versions with key metrics; which is champion; recent alias moves"
    ).set_defaults(func=_guarded(run_list))
    show = sub.add_parser("show", help="one version: run, metrics, tags, promotion history")
    show.add_argument("version", help="registered model version number")
    show.set_defaults(func=_guarded(run_show))
    promote = sub.add_parser("promote", help="run the gate for a version by hand (or --force it)")
    promote.add_argument("version", help="registered model version number")
    promote.add_argument(
        "--force", action="store_true", help="promote even if the gate refuses (needs --reason)"
    )
    promote.add_argument("--reason", help="why; required with --force, recorded in the history")
    promote.set_defaults(func=_guarded(run_promote))
    back = sub.add_parser("rollback", help="move the champion back to the previous champion")
    back.add_argument("--reason", default="rollback", help="why; recorded in the history")
    back.set_defaults(func=_guarded(run_rollback))


def _add_ui(subparsers) -> None:
    ui = subparsers.add_parser(
        "ui",
        help="the MLflow UI on the same store as training",
        description="Start `mlflow server` on the store.",
    )
    ui.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    ui.add_argument("--port", type=int, default=5000, help="port to listen on (default 5000)")
    ui.set_defaults(func=run_ui)


def _guarded(command):
    """Run a `models` action; an unexpected error prints one line and exits 1 (trace with -v)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except KeyboardInterrupt:
            print(f"interrupted: {_champion_now()}")
            return EXIT_INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - a scheduler needs an exit code
            log.debug("%s failed", command.__name__, exc_info=True)
            print(f"error: {redact_text(str(exc))}")
            return EXIT_ERROR

    return run


def _settings():
    from imgcls.settings import TrackingSettings
    from registry.settings import RegistrySettings

    return TrackingSettings(), RegistrySettings()


def run_pipeline_command(args: argparse.Namespace) -> int:
    """`imgcls pipeline`: the whole retrain, with a summary table and a documented exit code."""
    from registry.pipeline import InterruptedAfterPromotion, run_pipeline
    from training.cli import config_from_args, print_result
    from training.config import ConfigError
    from training.data import DatasetError

    try:
        config = config_from_args(args)
        tracking, settings = _settings()
        outcome = run_pipeline(config, tracking, settings)
    except (ConfigError, DatasetError) as exc:
        print(f"error: {redact_text(str(exc))}")
        return EXIT_BAD_INPUT
    except InterruptedAfterPromotion as exc:
        print(
            f"an interrupt arrived after the alias move completed: version {exc.version} is the new champion"
        )
        return EXIT_PROMOTED
    except KeyboardInterrupt:
        print(f"interrupted: {_champion_now()}")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a scheduler needs an exit code, the log has the trace
        log.exception("pipeline failed")
        print(f"error: {redact_text(str(exc))}")
        return EXIT_ERROR
    print_result(outcome.result)
    print_decision(outcome.decision, settings)
    return outcome.exit_code


def print_decision(decision, settings) -> None:
    """Candidate vs champion per metric, then the decision and why."""
    from rich.console import Console
    from rich.table import Table

    champion = f"champion v{decision.champion_version}" if decision.champion_version else "champion (none)"
    table = Table(title=f"gate on {decision.metric}: candidate v{decision.candidate_version} vs {champion}")
    for column in ("metric", f"candidate v{decision.candidate_version}", champion, "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name in _metric_order(decision.candidate_metrics | decision.champion_metrics):
        new, old = decision.candidate_metrics.get(name), decision.champion_metrics.get(name)
        change = f"{new - old:+.4f}" if new is not None and old is not None else ""
        table.add_row(_metric_label(name), _fmt(new), _fmt(old), change)
    console = Console()
    console.print(table)
    verdict = "[green]PROMOTED[/green]" if decision.passed else "[yellow]NOT PROMOTED[/yellow]"
    again = " (gate re-run: the champion changed meanwhile)" if decision.regated else ""
    console.print(f"decision: {verdict} version {decision.candidate_version} -> {settings.alias}{again}")
    console.print(f"why: {decision.reason}", markup=False)
    if decision.interrupted:
        console.print("note: an interrupt arrived after the alias move completed; the promotion stands")


def _champion_now() -> str:
    """What an interrupted command did to the alias, read back from the registry (a KeyboardInterrupt
    that reaches the CLI came before any alias move: one after it is reported as a promotion)."""
    try:
        from registry.versions import champion_version

        client, _, settings = _client()
        version = champion_version(client, settings)
    except Exception:  # noqa: BLE001 - a message, not a decision
        return "the champion could not be read back; see `imgcls models list`"
    now = f"version {version}" if version else "none"
    return f"this run did not move the {settings.alias} alias ({settings.alias} now: {now})"


def _metric_order(names) -> list[str]:
    from registry.gate import LOWER_IS_BETTER

    first = [n for n in ("accuracy", "macro_f1", *LOWER_IS_BETTER) if n in names]
    return first + sorted(n for n in names if n not in first)


def _metric_label(name: str) -> str:
    from registry.gate import LOWER_IS_BETTER

    return f"{name} (lower is better)" if name in LOWER_IS_BETTER else name


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _client():
    from registry.register import connect

    tracking, settings = _settings()
    return connect(tracking), tracking, settings


def run_list(args: argparse.Namespace) -> int:
    """`imgcls models list`."""
    from registry import report

    client, _, settings = _client()
    report.print_versions(client, settings)
    return 0


def run_show(args: argparse.Namespace) -> int:
    """`imgcls models show N`."""
    from registry import report
    from registry.versions import RegistryError

    client, _, settings = _client()
    try:
        report.print_version(client, settings, args.version)
    except RegistryError as exc:
        print(f"error: {redact_text(str(exc))}")
        return EXIT_BAD_INPUT
    return 0


def run_promote(args: argparse.Namespace) -> int:
    """`imgcls models promote N [--force --reason ...]`."""
    from registry import promote
    from registry.versions import RegistryError
    from training.data import DatasetError

    if args.force and not (args.reason or "").strip():
        print("error: --force needs --reason: say why the gate is overridden")
        return EXIT_BAD_INPUT
    client, tracking, settings = _client()
    try:
        scan = _logged_scan(client, settings, args.version, required=not args.force)
        if args.force:
            decision = promote.force_promote(client, tracking, settings, args.version, args.reason, scan)
        else:
            decision = promote.promote_if_better(client, tracking, settings, args.version, scan)
    except (RegistryError, DatasetError) as exc:
        print(f"error: {redact_text(str(exc))}")
        return EXIT_BAD_INPUT
    print_decision(decision, settings)
    return EXIT_PROMOTED if decision.passed else EXIT_NOT_PROMOTED


def _logged_scan(client, settings, version: str, required: bool):
    """The candidate's split, rebuilt from its run's `data/split.json`; None if gone and not required."""
    import mlflow

    from registry.versions import get_version
    from training.data import DatasetError, scan_from_manifest

    run_id = get_version(client, settings, version).run_id
    try:
        return scan_from_manifest(mlflow.artifacts.load_dict(f"runs:/{run_id}/data/split.json"))
    except (DatasetError, OSError, mlflow.exceptions.MlflowException) as exc:
        if required:
            raise DatasetError(f"cannot rebuild the test split of run {run_id}: {exc}") from exc
        log.warning("gate not run for the record: %s", exc)
        return None


def run_rollback(args: argparse.Namespace) -> int:
    """`imgcls models rollback`."""
    from registry import promote
    from registry.versions import RegistryError

    client, tracking, settings = _client()
    try:
        move = promote.rollback(client, tracking, settings, args.reason)
    except RegistryError as exc:
        print(f"error: {redact_text(str(exc))}")
        return EXIT_BAD_INPUT
    print(
        f"{settings.alias}: version {move.from_version} -> version {move.to_version} (rollback: {move.reason})"
    )
    return 0


def run_ui(args: argparse.Namespace) -> int:
    """`imgcls ui`: run `mlflow server` in the foreground on the configured store.

    `mlflow server` starts uvicorn as a child and dies on SIGTERM without passing it on,
    so the signals this command receives go to the server's whole process group, and
    what is left of it UI_GRACE_S later is killed (imgcls/processes.py).
    """
    from imgcls.processes import run_in_foreground
    from registry.server import server_command
    from registry.ui import UI_GRACE_S, ui_env

    tracking, _ = _settings()
    uri = tracking.resolved_tracking_uri()
    if not uri.startswith("sqlite:///"):
        print(f"the store is a tracking server: open {redact_text(uri)} in a browser")
        return 0
    env = ui_env(tracking, args.host, args.port)
    print(f"MLflow UI: http://{args.host}:{args.port}  (store {uri}; Ctrl-C stops it)", flush=True)
    code = run_in_foreground(server_command(), env=env, grace_s=UI_GRACE_S, to_group=True)
    return 0 if code in (128 + signal.SIGINT, 128 + signal.SIGTERM) else code
