"""The registry with real MLflow (SQLite in a temp folder) and really trained tiny models.

Three runs are trained once per module (a good model, a deliberately weak one, and one
on differently named classes); each test registers them under its own model name.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

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
    from registry.register import champion_version

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
    bento_versions = {
        m.info.labels.get("registry_version")
        for m in bentoml.models.list(settings.bento_model_name)
        if m.info.labels.get("registered_model") == settings.model_name
    }
    assert bento_versions == {v1, v2}


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
def test_champion_change_during_the_gate_makes_it_run_again(store):
    """Compare-and-set: a decision taken against an old champion is not applied blindly."""
    from registry.promote import commit_if_unchanged, run_gate

    tracking, good, weak, _ = store
    settings = registry_settings(first_model_floor=0.0)
    client, _, _ = _promote(store, settings, weak)  # v1
    stale = run_gate(settings, _register(settings, weak), weak.scan, None)  # v2 vs "no champion"
    assert stale.passed
    _, v3, _ = _promote(store, settings, good)  # meanwhile v3 becomes champion
    decision = commit_if_unchanged(client, tracking, settings, stale, weak.scan)
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


def test_alias_move_finishes_before_an_interrupt_is_raised():
    from registry.lock import interrupts_deferred

    steps = []
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        steps.append("history written")
        steps.append("alias moved")
    assert steps == ["history written", "alias moved"]


def test_champion_lineage_undoes_promotions_on_rollback():
    from registry.history import AliasMove, champion_lineage

    def move(action, old, new):
        return AliasMove(action=action, from_version=old, to_version=new, metric="macro_f1", reason="r")

    moves = [move("promote", None, "1"), move("promote", "1", "2"), move("promote", "2", "3")]
    assert champion_lineage(moves) == ["1", "2", "3"]
    assert champion_lineage([*moves, move("rollback", "3", "2")]) == ["1", "2"]
    assert champion_lineage([*moves, move("rollback", "3", "2"), move("rollback", "2", "1")]) == ["1"]
