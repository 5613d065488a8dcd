"""The promotion sequence (registry/steps.py): its pure plan, and a fault at every step.

Each step has a seam, `IMGCLS_HOOK_PROMOTE_<STEP>` (imgcls/hooks.py): `fail` raises there,
`kill` SIGKILLs a real `imgcls` process there, `hold:PATH` waits there. After any fault the
alias is the truth: the next command reconciles the history, the status tags and the
BentoML store with it, the service's source names the alias's version, rollback works
and the next promotion promotes normally. Real MLflow (SQLite, and a real `mlflow server`
that stops answering), a real BentoML store, one tiny model trained once.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from registry.steps import STEPS
from tests.registry_fixtures import (
    quick_config,
    registry_settings,
    start_imgcls,
    tracking_settings,
    write_dataset,
)

# A fault from this step on comes after the alias write succeeded: the move stands.
FIRST_AFTER_THE_ALIAS = STEPS.index("read_back")


def _alias_moved_at(step: str) -> bool:
    return STEPS.index(step) >= FIRST_AFTER_THE_ALIAS


# --- plan: pure, no I/O --------------------------------------------------------------------


def _evaluation(correct: int):
    """An Evaluation over 8 images of 3 classes with `correct` of them right."""
    from training.evaluate import Evaluation

    y_true = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = y_true.copy()
    y_pred[: 8 - correct] = (y_pred[: 8 - correct] + 1) % 3
    return Evaluation(["a", "b", "c"], y_true, np.eye(3)[y_pred])


def test_plan_promote_passes_refuses_and_never_reads_the_registry():
    from registry.steps import Force, GateEvidence, Move, Promote, Refusal, Snapshot, plan

    settings = registry_settings(margin=0.01, max_recall_drop=1.0)
    snap = Snapshot(champion="2", history_length=2, lineage=("1", "2"))
    better = GateEvidence("2", _evaluation(8), _evaluation(4))
    worse = GateEvidence("2", _evaluation(4), _evaluation(8))
    moved = plan(snap, Promote("3", better), settings)
    assert isinstance(moved, Move) and moved.verdict.passed
    assert (moved.move.from_version, moved.move.to_version, moved.move.forced) == ("2", "3", False)
    refused = plan(snap, Promote("3", worse), settings)
    assert isinstance(refused, Refusal) and "below the margin" in refused.reason and not refused.error
    assert plan(snap, Promote("2", better), settings).reason == "version 2 is already the champion"
    other = GateEvidence("2", _evaluation(8), None, mismatch="the champion was trained on different classes")
    assert "different classes" in plan(snap, Promote("3", other), settings).reason
    forced = plan(snap, Force("3", "hotfix", worse), settings)
    assert isinstance(forced, Move) and forced.move.forced and forced.move.reason.startswith("hotfix (gate: ")
    blind = plan(snap, Force("3", "hotfix", GateEvidence("2", None)), settings)
    assert blind.move.reason == "hotfix (gate: not run: test images unavailable)"
    assert plan(snap, Force("2", "x", better), settings).error


def test_plan_rollback_follows_the_lineage_and_refuses_without_one():
    from registry.steps import Move, Rollback, Snapshot, plan

    settings = registry_settings()
    snap = Snapshot("3", 3, lineage=("1", "2", "3"))
    back = plan(snap, Rollback("bad", {"2": {"macro_f1": 0.9}}), settings)
    assert isinstance(back, Move) and back.move.action == "rollback"
    assert (back.move.from_version, back.move.to_version) == ("3", "2")
    assert back.move.candidate_metrics == {"macro_f1": 0.9}
    assert "nothing to roll back" in plan(Snapshot(None, 0), Rollback("r"), settings).reason
    assert "first champion" in plan(Snapshot("1", 1, lineage=("1",)), Rollback("r"), settings).reason
    assert "does not end at" in plan(Snapshot("2", 1, lineage=("1",)), Rollback("r"), settings).reason


def test_snapshots_compare_on_what_a_move_changes():
    from registry.steps import Snapshot

    assert Snapshot("2", 2, lineage=("1", "2")) == Snapshot("2", 2)
    assert Snapshot("2", 2) != Snapshot("3", 2)
    assert Snapshot("2", 2) != Snapshot("2", 3)
    assert Snapshot("2", 2) != Snapshot("2", 2, pending=("2", "1"))
    assert Snapshot("2", 2) != Snapshot("2", 2, in_flight=3)


def test_locked_requests_are_bounded_and_restored(monkeypatch):
    from registry.steps import bounded_requests

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with bounded_requests(registry_settings(locked_request_timeout_s=3, locked_request_retries=0)):
        from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

        assert (MLFLOW_HTTP_REQUEST_TIMEOUT.get(), MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()) == (3, 0)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "120"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


# --- a fault at every step, on a real store ------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(TrackingSettings, TrainResult): one tiny model, trained once, registered many times."""
    from training.train import train

    root = tmp_path_factory.mktemp("faults")
    tracking = tracking_settings(root)
    result = train(quick_config(write_dataset(root / "shapes"), epochs=1), tracking)
    return tracking, result


@pytest.fixture
def champions(trained):
    """A fresh model with versions 1, 2, 3 of the one run; 1 then 2 made champion.

    Returns (client, tracking, settings)."""
    from registry.promote import force_promote
    from registry.register import connect, register_candidate

    tracking, result = trained
    client = connect(tracking)
    settings = registry_settings()
    for _ in range(3):
        register_candidate(settings, result.model_uri, result.run_id, result.card, result.metrics)
    for version in ("1", "2"):
        force_promote(client, tracking, settings, version, "set-up", None)
    assert _served(settings) == "2"
    return client, tracking, settings


def _env(tracking, settings) -> dict[str, str]:
    return {
        "MLFLOW_TRACKING_URI": tracking.resolved_tracking_uri(),
        "IMGCLS_HOME": str(tracking.home),
        "IMGCLS_REGISTRY_MODEL_NAME": settings.model_name,
        "BENTOML_HOME": os.environ["BENTOML_HOME"],
        "COLUMNS": "200",
    }


def _cli(tracking, settings, *argv, extra: dict | None = None) -> int:
    from imgcls.cli import main

    with pytest.MonkeyPatch.context() as mp:
        for key, value in (_env(tracking, settings) | (extra or {})).items():
            mp.setenv(key, value)
        return main(list(argv))


def _served(settings) -> str:
    """The registry version `imgcls serve --source bentoml` would load now."""
    import bentoml

    from service.sources import BentoSource

    tag = BentoSource(settings.bento_model_name, settings.alias, settings.model_name).champion()
    return bentoml.models.get(tag).info.labels["registry_version"]


def _labelled(settings) -> list[str]:
    from service.store import champion_entries

    entries = champion_entries(settings.bento_model_name, settings.alias, settings.model_name)
    return [m.info.labels["registry_version"] for m in entries]


def _assert_agree(client, settings) -> str:
    """Alias, history, status tags and BentoML labels agree; the service names the alias's
    version. Returns that version."""
    from registry.history import IN_FLIGHT_TAG, champion_lineage, read_history
    from registry.versions import champion_version

    alias = champion_version(client, settings)
    moves = read_history(client, settings)
    assert IN_FLIGHT_TAG not in client.get_registered_model(settings.model_name).tags
    assert moves[-1].to_version == alias and champion_lineage(moves)[-1] == alias
    assert all(m.action != "manual" for m in moves), [m.action for m in moves]
    assert client.get_model_version(settings.model_name, alias).tags["imgcls.status"] == "promoted"
    assert _labelled(settings) == [alias]
    assert _served(settings) == alias
    return alias


def _after_the_fault(client, tracking, settings, step: str) -> None:
    """The checks every fault ends with: state, the next command, rollback, a normal promotion."""
    from registry.history import read_history
    from registry.promote import force_promote
    from registry.versions import champion_version

    moved = _alias_moved_at(step)
    assert champion_version(client, settings) == ("3" if moved else "2")
    # Before any reconcile the service never names a version the alias did not point at.
    assert _served(settings) in (("3", "2") if moved else ("2",))
    # The next command (rollback) reconciles first, then moves.
    assert _cli(tracking, settings, "models", "rollback", "--reason", f"after {step}") == 0
    expected = ["1", "2", "3", "2"] if moved else ["1", "2", "1"]
    assert [m.to_version for m in read_history(client, settings)] == expected
    assert _assert_agree(client, settings) == expected[-1]
    status = client.get_model_version(settings.model_name, "3").tags["imgcls.status"]
    assert status == ("promoted" if moved else "candidate")  # never champion, never tagged so
    # And the next promotion promotes normally.
    assert force_promote(client, tracking, settings, "3", "again", None).passed
    assert _assert_agree(client, settings) == "3"


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_a_failure_at_each_step_leaves_the_alias_the_truth(champions, step, monkeypatch):
    from imgcls.hooks import HookFault
    from registry.promote import force_promote

    client, tracking, settings = champions
    monkeypatch.setenv(f"IMGCLS_HOOK_PROMOTE_{step.upper()}", "fail")
    if _alias_moved_at(step):  # logged, never reported as "not promoted"
        assert force_promote(client, tracking, settings, "3", "r", None).passed
    else:
        with pytest.raises(HookFault, match=step):
            force_promote(client, tracking, settings, "3", "r", None)
    monkeypatch.delenv(f"IMGCLS_HOOK_PROMOTE_{step.upper()}")
    _after_the_fault(client, tracking, settings, step)


@pytest.mark.slow
def test_an_alias_write_whose_answer_is_lost_is_read_before_anything_is_undone(champions, monkeypatch):
    """The alias write lands but its response is lost (the connection drops): the alias is
    read first, the move stands, nothing is taken back, BentoML is labelled."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from registry.history import read_history
    from registry.promote import force_promote

    client, tracking, settings = champions
    real = MlflowClient.set_registered_model_alias

    def write_then_lose_the_answer(self, *args, **kwargs):
        real(self, *args, **kwargs)
        raise MlflowException("API request failed: connection reset by peer")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", write_then_lose_the_answer)
    assert force_promote(client, tracking, settings, "3", "r", None).passed
    monkeypatch.undo()
    assert [m.to_version for m in read_history(client, settings)] == ["1", "2", "3"]
    assert _assert_agree(client, settings) == "3"


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_each_step_is_reconciled_by_the_next_command(champions, step, tmp_path):
    """A real `imgcls models promote 3 --force` SIGKILLed at the step (the gate runs too)."""
    client, tracking, settings = champions
    env = _env(tracking, settings) | {f"IMGCLS_HOOK_PROMOTE_{step.upper()}": "kill"}
    log = tmp_path / "promote.log"
    proc = start_imgcls(["models", "promote", "3", "--force", "--reason", "r"], env, log)
    assert proc.wait(timeout=300) == -signal.SIGKILL, log.read_text()[-3000:]
    _after_the_fault(client, tracking, settings, step)


@pytest.mark.slow
def test_a_pipeline_killed_after_recording_is_reconciled_and_the_next_pipeline_promotes(tmp_path):
    """`imgcls pipeline` SIGKILLed after its history record, before the alias moved: the
    next pipeline removes the record, gates against the real champion and promotes."""
    from mlflow import MlflowClient

    from registry.history import read_history
    from registry.settings import RegistrySettings
    from registry.versions import champion_version

    tracking = tracking_settings(tmp_path)
    settings = RegistrySettings(model_name="faults-pipeline")
    data = write_dataset(tmp_path / "shapes")
    train = ["pipeline", "--data", str(data), "--backbone", "simple_cnn", "--image-size", "32",
             "--epochs", "2", "--batch-size", "8", "--no-augment"]  # fmt: skip
    lenient = {"IMGCLS_REGISTRY_MARGIN": "-1", "IMGCLS_REGISTRY_MAX_RECALL_DROP": "1",
               "IMGCLS_REGISTRY_FIRST_MODEL_FLOOR": "0"}  # fmt: skip
    assert _cli(tracking, settings, *train, extra=lenient) == 0  # version 1
    env = _env(tracking, settings) | lenient | {"IMGCLS_HOOK_PROMOTE_MOVE_ALIAS": "kill"}
    proc = start_imgcls(train, env, tmp_path / "killed.log")
    assert proc.wait(timeout=600) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    uri = tracking.resolved_tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert champion_version(client, settings) == "1" and _served(settings) == "1"
    assert [m.to_version for m in read_history(client, settings)] == ["1", "2"]  # recorded, never moved
    assert _cli(tracking, settings, *train, extra=lenient) == 0  # version 3
    assert [m.to_version for m in read_history(client, settings)] == ["1", "3"]
    assert _assert_agree(client, settings) == "3"
    assert client.get_model_version(settings.model_name, "2").tags["imgcls.status"] != "promoted"


# --- an MLflow server that stops answering while the lock is held --------------------------


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on SQLite (registry/server.py); yields (ServerProcess, url)."""
    from imgcls.processes import QUIET_ENV, ServerProcess, free_port
    from registry.server import server_command, server_env

    port = free_port()
    env = server_env(f"sqlite:///{tmp_path}/server.db", str(tmp_path / "artifacts"), "127.0.0.1", port,
                     MLFLOW_WORKERS="1") | QUIET_ENV  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with ServerProcess(server_command(), f"{url}/health", tmp_path / "server.log", env=env, port=port) as srv:
        yield srv, url


@pytest.mark.slow
@pytest.mark.timing
def test_a_hung_tracking_server_fails_the_locked_write_in_seconds(mlflow_server, tmp_path):
    """Held under the lock, the server is SIGSTOPped (connections accepted, never answered),
    then the promotion goes on: it fails within seconds, the alias unchanged; after SIGCONT
    the next command reconciles and everything agrees."""
    from mlflow import MlflowClient

    from registry.lock import LEASE_TAG
    from registry.promote import force_promote
    from registry.register import connect, register_candidate
    from registry.versions import champion_version
    from training.train import train

    server, url = mlflow_server
    tracking = tracking_settings(tmp_path, url)
    settings = registry_settings(lease_s=6)
    result = train(quick_config(write_dataset(tmp_path / "shapes"), epochs=1), tracking)
    client = connect(tracking)
    for _ in range(3):
        register_candidate(settings, result.model_uri, result.run_id, result.card, result.metrics)
    for version in ("1", "2"):
        force_promote(client, tracking, settings, version, "set-up", None)
    hold = tmp_path / "hold"
    hold.touch()
    env = _env(tracking, settings) | {
        "MLFLOW_TRACKING_URI": url,
        "IMGCLS_REGISTRY_LEASE_S": "6",
        "IMGCLS_HOOK_PROMOTE_RECORD_HISTORY": f"hold:{hold}",
    }
    log = tmp_path / "promote.log"
    proc = start_imgcls(["models", "promote", "3", "--force", "--reason", "r"], env, log)
    try:
        deadline = time.monotonic() + 240
        while LEASE_TAG not in client.get_registered_model(settings.model_name).tags:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(2)  # from the lease to the held step: a few reads
        os.killpg(server.pid, signal.SIGSTOP)
        started = time.monotonic()
        hold.unlink()
        code = proc.wait(timeout=120)  # MLflow's defaults would take ~20 minutes
        took = time.monotonic() - started
    finally:
        os.killpg(server.pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert code == 1 and "error:" in output, output[-3000:]
    print(f"the promotion failed {took:.1f} s after the server stopped answering")
    assert took < 60, f"the hung write took {took:.0f} s"  # bounded: ~10 s per request
    fresh = MlflowClient(tracking_uri=url, registry_uri=url)
    assert champion_version(fresh, settings) == "2"
    time.sleep(2)  # requests the stopped server had queued are answered now
    assert _cli(tracking, settings, "models", "rollback", extra={"MLFLOW_TRACKING_URI": url,
                "IMGCLS_REGISTRY_LEASE_S": "6"}) == 0  # fmt: skip
    assert _assert_agree(fresh, settings) == "1"
    assert force_promote(fresh, tracking, settings, "3", "again", None).passed
    assert _assert_agree(fresh, settings) == "3"
