"""The registry with real MLflow (SQLite in a temp folder) and really trained tiny models.

Three runs are trained once per module (a good model, a deliberately weak one, and one
on differently named classes); each test registers them under its own model name.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.registry_fixtures import (
    quick_config,
    registry_settings,
    tracking_settings,
    weak_overrides,
    write_dataset,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(TrackingSettings, good TrainResult, weak TrainResult, other-classes TrainResult)."""
    from training.train import train

    root = tmp_path_factory.mktemp("registry")
    tracking = tracking_settings(root)
    data = write_dataset(root / "shapes")
    renamed = write_dataset(
        root / "renamed", classes={"a": (220, 40, 40), "b": (40, 200, 60), "c": (40, 60, 220)}
    )
    good = train(quick_config(data), tracking)
    weak = train(quick_config(data, **weak_overrides()), tracking)
    other = train(quick_config(renamed, epochs=1), tracking)
    assert good.metrics["macro_f1"] > weak.metrics["macro_f1"] + 0.2, "test models must differ clearly"
    return tracking, good, weak, other


def _register(settings, result) -> str:
    from registry.register import register_candidate

    return register_candidate(settings, result.model_uri, result.run_id, result.card, result.metrics)


def _promote(store, settings, result):
    """Register `result` as a new version and run the gate on its own test split."""
    from registry.promote import promote_if_better
    from registry.register import connect

    tracking = store[0]
    client = connect(tracking)
    version = _register(settings, result)
    return client, version, promote_if_better(client, tracking, settings, version, result.scan)


def _champion(client, settings):
    from registry.versions import champion_version

    return champion_version(client, settings)


def _history(client, settings):
    from registry.history import read_history

    return read_history(client, settings)


@pytest.mark.slow
def test_better_candidate_becomes_champion_and_the_move_is_recorded(store):
    import bentoml

    _, good, weak, _ = store
    settings = registry_settings(first_model_floor=0.0)
    client, v1, first = _promote(store, settings, weak)
    assert first.passed and _champion(client, settings) == v1
    client, v2, second = _promote(store, settings, good)
    assert second.passed, second.reason
    assert _champion(client, settings) == v2
    moves = _history(client, settings)
    assert [(m.from_version, m.to_version, m.action) for m in moves] == [
        (None, v1, "promote"),
        (v1, v2, "promote"),
    ]
    assert moves[1].candidate_metrics["macro_f1"] > moves[1].champion_metrics["macro_f1"]
    assert moves[1].forced is False and "beats champion" in moves[1].reason
    tags = client.get_model_version(settings.model_name, v2).tags
    assert tags["imgcls.status"] == "promoted" and tags["backbone"] == "simple_cnn"
    assert json.loads(tags["class_names"]) == ["circle", "square", "stripes"]
    assert tags["run_id"] == good.run_id and tags["dataset.fingerprint"] == good.scan.fingerprint
    assert float(tags["metric.macro_f1"]) == pytest.approx(good.metrics["macro_f1"], abs=1e-5)
    assert settings.bento_model_name == settings.model_name
    bento_versions = [
        m.info.labels.get("registry_version")
        for m in bentoml.models.list(settings.bento_model_name)
        if m.info.labels.get("registered_model") == settings.model_name
    ]
    assert bento_versions == [v2]  # the earlier champion's entry is gone once the alias moved


@pytest.mark.slow
def test_worse_candidate_is_registered_but_champion_stays(store):
    _, good, weak, _ = store
    settings = registry_settings()
    client, v1, _ = _promote(store, settings, good)
    client, v2, decision = _promote(store, settings, weak)
    assert not decision.passed
    assert "macro_f1" in decision.reason and "below the margin" in decision.reason
    assert decision.champion_version == v1
    assert _champion(client, settings) == v1
    assert client.get_model_version(settings.model_name, v2).tags["imgcls.status"] == "rejected"
    assert [m.to_version for m in _history(client, settings)] == [v1]


@pytest.mark.slow
def test_first_model_must_meet_the_floor(store):
    _, _, weak, _ = store
    settings = registry_settings(first_model_floor=0.99)
    client, _, decision = _promote(store, settings, weak)
    assert not decision.passed and "below the floor 0.99" in decision.reason
    assert _champion(client, settings) is None


@pytest.mark.slow
def test_recall_bound_refuses_even_when_the_metric_condition_holds(store):
    _, good, weak, _ = store
    # margin -1: any macro-F1 passes the metric condition, so only the recall bound can refuse.
    settings = registry_settings(margin=-1.0, max_recall_drop=0.1)
    client, v1, _ = _promote(store, settings, good)
    _, _, decision = _promote(store, settings, weak)
    assert not decision.passed
    assert "recall of class" in decision.reason and "margin" not in decision.reason
    assert _champion(client, settings) == v1


def test_gate_decision_on_per_class_recall():
    from registry.gate import decide
    from training.evaluate import Evaluation

    names = ["a", "b", "c"]
    y_true = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    champion = Evaluation(names, y_true, np.eye(3)[[0, 1, 1, 1, 2, 2, 0, 0]])  # c: recall 0.5
    candidate = Evaluation(names, y_true, np.eye(3)[[0, 0, 1, 0, 2, 2, 2, 2]])  # b: recall 1 -> 0.5
    assert candidate.metrics()["macro_f1"] > champion.metrics()["macro_f1"]
    passed, reason = decide(candidate, champion, registry_settings(margin=0.0, max_recall_drop=0.2))
    assert not passed and "recall of class 'b' falls by 0.5000" in reason
    passed, reason = decide(candidate, champion, registry_settings(margin=0.0, max_recall_drop=0.5))
    assert passed, reason


@pytest.mark.slow
def test_champion_trained_on_other_classes_is_not_compared(store):
    _, good, _, other = store
    settings = registry_settings(first_model_floor=0.0)
    client, v1, _ = _promote(store, settings, other)
    _, _, decision = _promote(store, settings, good)
    assert not decision.passed
    assert "different classes ['a', 'b', 'c']" in decision.reason
    assert _champion(client, settings) == v1


@pytest.mark.slow
def test_champion_change_during_the_gate_makes_it_run_again(store, monkeypatch):
    """Compare-and-set: a decision taken against an old champion is not applied blindly,
    and the gate runs again outside the registry lock (evaluations are slow)."""
    import registry.promote
    from registry.lock import file_lock
    from registry.promote import promote_if_better

    tracking, good, weak, _ = store
    settings = registry_settings(first_model_floor=0.0)
    from registry.register import connect

    client = connect(tracking)
    v2, v3 = _register(settings, weak), _register(settings, good)
    lock = Path(tracking.resolved_tracking_uri().removeprefix("sqlite:///") + f".{settings.model_name}.lock")
    real, calls = registry.promote.evaluate_version, []

    def gate_without_the_lock_meanwhile_v3_wins(settings_, version, scan):
        calls.append(version)
        with file_lock(lock, timeout_s=0.5):  # LockTimeout if this process holds it
            result = real(settings_, version, scan)
        if len(calls) == 1:  # v2 passed against "no champion": meanwhile v3 becomes champion
            registry.promote.force_promote(client, tracking, settings, v3, "meanwhile", None)
        return result

    monkeypatch.setattr(registry.promote, "evaluate_version", gate_without_the_lock_meanwhile_v3_wins)
    decision = promote_if_better(client, tracking, settings, v2, weak.scan)
    assert calls == [v2, v3]  # the candidate once, then the new champion
    assert decision.regated and not decision.passed and decision.champion_version == v3
    assert _champion(client, settings) == v3


def _cli(monkeypatch, store, settings, *argv) -> int:
    from imgcls.cli import main

    tracking = store[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.resolved_tracking_uri())
    monkeypatch.setenv("IMGCLS_HOME", str(tracking.home))
    monkeypatch.setenv("IMGCLS_REGISTRY_MODEL_NAME", settings.model_name)
    monkeypatch.setenv("IMGCLS_REGISTRY_BENTO_IMPORT", "false")
    monkeypatch.setenv("COLUMNS", "200")
    return main(list(argv))


@pytest.mark.slow
def test_promote_by_hand_force_needs_a_reason_and_rollback(store, monkeypatch, capsys):
    from registry.register import connect

    _, good, weak, _ = store
    settings = registry_settings(bento_import=False)
    client = connect(store[0])
    v1, v2 = _register(settings, good), _register(settings, weak)
    assert _cli(monkeypatch, store, settings, "models", "promote", v1) == 0  # split rebuilt from the run
    assert _cli(monkeypatch, store, settings, "models", "promote", v2) == 3
    assert "NOT PROMOTED" in capsys.readouterr().out
    assert _cli(monkeypatch, store, settings, "models", "promote", v2, "--force") == 2
    assert "--force needs --reason" in capsys.readouterr().out
    assert _champion(client, settings) == v1
    assert (
        _cli(monkeypatch, store, settings, "models", "promote", v2, "--force", "--reason", "hotfix for demo")
        == 0
    )
    assert _champion(client, settings) == v2
    forced = _history(client, settings)[-1]
    assert forced.forced and forced.reason.startswith("hotfix for demo") and forced.from_version == v1
    assert _cli(monkeypatch, store, settings, "models", "rollback", "--reason", "bad hotfix") == 0
    assert f"version {v2} -> version {v1}" in capsys.readouterr().out
    assert _champion(client, settings) == v1
    last = _history(client, settings)[-1]
    assert (last.action, last.from_version, last.to_version, last.reason) == (
        "rollback",
        v2,
        v1,
        "bad hotfix",
    )
    assert _cli(monkeypatch, store, settings, "models", "rollback") == 2
    assert "no previous champion" in capsys.readouterr().out
    assert _champion(client, settings) == v1


@pytest.mark.slow
def test_models_list_and_show_print_champion_and_history(store, monkeypatch, capsys):
    _, good, weak, _ = store
    settings = registry_settings(bento_import=False)
    _promote(store, settings, good)
    _, v2, _ = _promote(store, settings, weak)
    capsys.readouterr()
    assert _cli(monkeypatch, store, settings, "models", "list") == 0
    out = capsys.readouterr().out
    assert f"{settings.model_name} (champion: version 1)" in out
    assert "rejected" in out and "first champion" in out
    assert _cli(monkeypatch, store, settings, "models", "show", "1") == 0
    out = capsys.readouterr().out
    assert good.run_id in out and "test_macro_f1" in out and "alias moves of version 1" in out
    assert _cli(monkeypatch, store, settings, "models", "show", "99") == 2
    assert "no version 99" in capsys.readouterr().out


def test_alias_move_finishes_and_the_interrupt_is_reported_not_raised():
    from registry.lock import interrupts_deferred

    steps = []
    with interrupts_deferred() as received:
        os.kill(os.getpid(), signal.SIGINT)
        steps.append("history written")
        steps.append("alias moved")
    assert steps == ["history written", "alias moved"] and received == [signal.SIGINT]


def test_champion_lineage_undoes_promotions_on_rollback():
    from registry.history import AliasMove, champion_lineage

    def move(action, old, new):
        return AliasMove(action=action, from_version=old, to_version=new, metric="macro_f1", reason="r")

    moves = [move("promote", None, "1"), move("promote", "1", "2"), move("promote", "2", "3")]
    assert champion_lineage(moves) == ["1", "2", "3"]
    assert champion_lineage([*moves, move("rollback", "3", "2")]) == ["1", "2"]
    assert champion_lineage([*moves, move("rollback", "3", "2"), move("rollback", "2", "1")]) == ["1"]


@pytest.mark.slow
def test_ctrl_c_during_the_alias_move_reports_the_promotion(store, monkeypatch, capsys):
    """The signal lands right after the alias write: the move stands and is reported (exit 0)."""
    _, good, _, _ = store
    settings = registry_settings(bento_import=False)
    version = _register(settings, good)
    real = MlflowClient.set_registered_model_alias

    def alias_then_ctrl_c(self, *args, **kwargs):
        real(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", alias_then_ctrl_c)
    assert _cli(monkeypatch, store, settings, "models", "promote", version) == 0
    out = capsys.readouterr().out
    assert "PROMOTED" in out and "an interrupt arrived after the alias move completed" in out
    client = MlflowClient(tracking_uri=store[0].resolved_tracking_uri())
    assert _champion(client, settings) == version
    assert client.get_model_version(settings.model_name, version).tags["imgcls.status"] == "promoted"


@pytest.mark.slow
def test_interrupt_after_the_promotion_never_retags_the_champion(store):
    from registry.pipeline import status_on_failure

    _, good, _, _ = store
    settings = registry_settings(bento_import=False)
    client, version, decision = _promote(store, settings, good)
    assert decision.passed
    with pytest.raises(KeyboardInterrupt) as caught, status_on_failure(client, settings, version):
        raise KeyboardInterrupt  # e.g. Ctrl-C just after move_alias returned
    assert _champion(client, settings) == version
    assert client.get_model_version(settings.model_name, version).tags["imgcls.status"] == "promoted"
    assert type(caught.value).__name__ == "InterruptedAfterPromotion" and caught.value.version == version


@pytest.mark.slow
def test_status_write_failing_after_the_alias_moved_still_reports_the_promotion(store, monkeypatch):
    from registry.pipeline import status_on_failure
    from registry.promote import promote_if_better
    from registry.register import connect

    tracking, good, _, _ = store
    settings = registry_settings(bento_import=False)
    client = connect(tracking)
    version = _register(settings, good)
    real = MlflowClient.set_model_version_tag

    def promoted_tag_fails(self, name, version, key, value):
        if key == "imgcls.status" and value == "promoted":
            raise MlflowException("the server went away")
        return real(self, name, version, key, value)

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", promoted_tag_fails)
    with status_on_failure(client, settings, version):
        decision = promote_if_better(client, tracking, settings, version, good.scan, None)
    monkeypatch.undo()
    assert decision.passed and _champion(client, settings) == version
    assert client.get_model_version(settings.model_name, version).tags["imgcls.status"] == "candidate"


@pytest.mark.slow
def test_bento_store_serves_the_champion_after_rollback_and_after_a_failed_move(store, monkeypatch):
    """promote v1, promote v2, rollback: the service's loader picks v1; a move whose alias
    write fails leaves no BentoML entry behind."""
    from registry.promote import promote_if_better, rollback
    from service.settings import ServiceSettings
    from service.sources import load_predictor

    tracking, good, weak, _ = store
    settings = registry_settings(first_model_floor=0.0, margin=-1.0, max_recall_drop=1.0)

    def served() -> str:
        return load_predictor(ServiceSettings(model_name=settings.model_name)).version

    client, v1, _ = _promote(store, settings, weak)
    _, v2, second = _promote(store, settings, good)
    assert second.passed and served() == v2
    rollback(client, tracking, settings, "v2 misbehaves")
    assert _champion(client, settings) == v1 and served() == v1
    v3 = _register(settings, good)

    def alias_fails(self, *args, **kwargs):
        raise MlflowException("the server went away")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", alias_fails)
    with pytest.raises(MlflowException, match="went away"):
        promote_if_better(client, tracking, settings, v3, good.scan)
    monkeypatch.undo()
    assert _champion(client, settings) == v1 and served() == v1
    from service.store import champion_entries

    labelled = champion_entries(settings.bento_model_name, settings.alias, settings.model_name)
    assert [m.info.labels["registry_version"] for m in labelled] == [v1]
    assert [m.to_version for m in _history(client, settings)] == [v1, v2, v1]


def _bare_model(tmp_path, versions: int, **settings_values):
    """A registered model with `versions` versions whose files are never read (no BentoML)."""
    from registry.register import connect

    tracking = tracking_settings(tmp_path)
    client = connect(tracking)
    settings = registry_settings(bento_import=False, **settings_values)
    client.create_registered_model(settings.model_name)
    for _ in range(versions):
        client.create_model_version(settings.model_name, source=str(tmp_path / "not-read"))
    return client, tracking, settings


def _move(old, new, candidate=None, champion=None, reason="r"):
    from registry.history import AliasMove

    return AliasMove(
        action="promote",
        from_version=old,
        to_version=new,
        metric="macro_f1",
        candidate_metrics=candidate or {},
        champion_metrics=champion or {},
        reason=reason,
    )


def test_history_tags_stay_under_5000_chars_with_200_classes(tmp_path):
    """MLflow's registered-model tag column is String(5000) (PostgreSQL enforces it)."""
    from registry.promote import move_alias, rollback

    client, tracking, settings = _bare_model(tmp_path, 4)
    classes = [f"class-{i:03d}-{'x' * 40}" for i in range(200)]

    def metrics(level, dip=0.0):
        recalls = {f"recall_{c}": level - (dip if i == 150 else 0) for i, c in enumerate(classes)}
        return {"accuracy": level, "macro_f1": level} | recalls

    champion = None
    for version, level in (("1", 0.5), ("2", 0.6), ("3", 0.7), ("4", 0.8)):
        old = metrics(level - 0.1) if champion else None
        move_alias(client, settings, _move(champion, version, metrics(level, 0.2), old, "why " * 500))
        champion = version
    rollback(client, tracking, settings, "bad release " * 300)
    tags = client.get_registered_model(settings.model_name).tags
    assert len(tags) >= 5 and max(len(value) for value in tags.values()) < 5000
    from registry.history import move_details

    moves = _history(client, settings)
    assert [(m.from_version, m.to_version, m.action) for m in moves] == [
        (None, "1", "promote"),
        ("1", "2", "promote"),
        ("2", "3", "promote"),
        ("3", "4", "promote"),
        ("4", "3", "rollback"),
    ]
    assert _champion(client, settings) == "3"
    assert moves[1].candidate_metrics == {"macro_f1": 0.6} and moves[1].champion_metrics == {"macro_f1": 0.5}
    worst, drop = moves[1].worst_recall_drop()
    assert worst == classes[150] and drop == pytest.approx(0.1)
    full = move_details(client, settings, moves[1])  # every number, on the promoted version
    assert sum(k.startswith("recall_") for k in full.candidate_metrics) == 200
    assert full.reason == "why " * 500


def test_a_failed_history_read_is_raised_and_erases_nothing(tmp_path, monkeypatch):
    from registry.history import read_history
    from registry.promote import move_alias

    client, _, settings = _bare_model(tmp_path, 3)
    move_alias(client, settings, _move(None, "1"))
    move_alias(client, settings, _move("1", "2"))
    assert read_history(client, registry_settings()) == []  # no such model: no history

    def unavailable(self, name):
        raise MlflowException("database is locked", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(MlflowClient, "get_registered_model", unavailable)
    with pytest.raises(MlflowException, match="locked"):
        read_history(client, settings)
    with pytest.raises(MlflowException, match="locked"):
        move_alias(client, settings, _move("2", "3"))
    monkeypatch.undo()
    assert [m.to_version for m in _history(client, settings)] == ["1", "2"]
    assert _champion(client, settings) == "2"


def test_remote_lease_is_renewed_while_held(tmp_path):
    """The heartbeat pushes the lease's expiry forward while it is held. No competitor races
    it: the test waits for a renewal to show, then checks the lease at once (3 s of life)."""
    from registry.lock import LEASE_TAG, tag_lease

    client, _, settings = _bare_model(tmp_path, 1, lease_s=3.0)

    def expires() -> float:
        return json.loads(client.get_registered_model(settings.model_name).tags[LEASE_TAG])["expires"]

    with tag_lease(client, settings) as held:
        first = expires()
        deadline = time.monotonic() + 60
        while expires() <= first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert expires() > first, "the heartbeat never renewed the lease"
        held.check()


def test_a_lost_lease_is_caught_before_writing(tmp_path):
    """A lease taken over while held stops the alias move. The lease lasts 60 s, so no
    heartbeat (every 20 s) can write ours back over the stolen one during the test."""
    from registry.lock import LEASE_TAG, LockLost, tag_lease
    from registry.promote import move_alias

    client, _, settings = _bare_model(tmp_path, 1, lease_s=60.0)
    with tag_lease(client, settings) as held:
        held.check()
        stolen = {"owner": "another-writer", "expires": time.time() + 60}
        client.set_registered_model_tag(settings.model_name, LEASE_TAG, json.dumps(stolen))
        with pytest.raises(LockLost):
            move_alias(client, settings, _move(None, "1"), held)
    assert _history(client, settings) == [] and _champion(client, settings) is None
