"""Champion moves made by hand (MLflow's UI, `set_registered_model_alias`): noticed by the
next registry command, recorded as a move outside the gate, and `rollback` keeps working.

The pure comparison is tested with no I/O; the rest on real MLflow (SQLite in tmp_path),
with versions whose files are never read, and one real pipeline after a hand move.
"""

from __future__ import annotations

import pytest

from tests.registry_fixtures import registry_settings, tracking_settings, write_dataset


def _move(action, old, new, reason="r"):
    from registry.history import AliasMove

    return AliasMove(action=action, from_version=old, to_version=new, metric="macro_f1", reason=reason)


def test_manual_move_is_the_difference_between_history_and_alias():
    from registry.reconcile import OUTSIDE, manual_move

    moves = [_move("promote", None, "1"), _move("promote", "1", "2")]
    assert manual_move(moves, "2", "macro_f1") is None
    assert manual_move([], None, "macro_f1") is None
    by_hand = manual_move(moves, "1", "macro_f1", at="2026-01-02T03:04:05+00:00")
    assert (by_hand.action, by_hand.from_version, by_hand.to_version) == ("manual", "2", "1")
    assert by_hand.by == OUTSIDE == "unknown (outside imgcls)"
    assert by_hand.reason == "alias moved outside the gate" and by_hand.at.startswith("2026-01-02")
    removed = manual_move(moves, None, "macro_f1")
    assert (removed.from_version, removed.to_version, removed.reason) == (
        "2",
        None,
        "alias removed outside the gate",
    )
    first = manual_move([], "3", "macro_f1")  # an alias set by hand before imgcls ever promoted
    assert (first.from_version, first.to_version) == (None, "3")
    after_rollback = [*moves, _move("rollback", "2", "1")]
    assert manual_move(after_rollback, "1", "macro_f1") is None


def test_lineage_treats_a_manual_move_as_a_promotion_and_a_removal_as_an_end():
    from registry.history import champion_lineage

    moves = [_move("promote", None, "1"), _move("promote", "1", "2"), _move("manual", "2", "1")]
    assert champion_lineage(moves) == ["1", "2", "1"]  # rollback goes back to 2
    assert champion_lineage([*moves, _move("rollback", "1", "2")]) == ["1", "2"]
    removed = [*moves, _move("manual", "1", None)]
    assert champion_lineage(removed) == []
    assert champion_lineage([*removed, _move("promote", None, "3")]) == ["3"]


def test_reconcile_is_a_plan_over_the_snapshot_alone():
    """What must be repaired, in order, from a snapshot and nothing else (no MLflow, no BentoML)."""
    from registry.reconcile import MarkPromoted, MirrorBento, RecordHandMove, Settle, Snapshot, reconcile

    assert reconcile(Snapshot("2", 2, status="promoted", bento=(("clf:b", "2"),))) == ()
    assert reconcile(Snapshot("2", 2, status="promoted")) == ()  # the store not read: nothing about it
    # a move left in flight: kept if the alias points at it (its bookkeeping tags it), else removed
    half_done = {"history_length": 3, "in_flight": 3, "in_flight_move": ("2", "3")}
    assert reconcile(Snapshot("3", status="candidate", **half_done)) == (Settle(3, "2", "3", happened=True),)
    assert reconcile(Snapshot("2", status="promoted", **half_done)) == (Settle(3, "2", "3", happened=False),)
    # a hand move is recorded (its bookkeeping tags the hand-picked version); so is a removal
    assert reconcile(Snapshot("1", 2, pending=("2", "1"), status="candidate")) == (RecordHandMove("2", "1"),)
    assert reconcile(Snapshot(None, 2, pending=("2", None), bento=(("clf:b", "2"),))) == (
        RecordHandMove("2", None),
    )  # no champion: the store keeps the last one
    assert reconcile(Snapshot("2", 2, status="rejected")) == (MarkPromoted("2"),)
    # the store mirrors the alias: the champion's entry kept (imported if it has none), others retired
    strays = (("clf:new", "3"), ("clf:old", "2"))
    assert reconcile(Snapshot("2", 2, status="promoted", bento=strays)) == (MirrorBento("2", keep="clf:old"),)
    assert reconcile(Snapshot("2", 2, status="promoted", bento=())) == (MirrorBento("2", keep=None),)
    # the marker first (a half-done move is no hand move), then the hand move, then the store
    everything = Snapshot("4", pending=("2", "4"), status="candidate", bento=(), **half_done)
    assert reconcile(everything) == (
        Settle(3, "2", "3", False),
        RecordHandMove("2", "4"),
        MirrorBento("4", None),
    )
    assert not everything.settled and Snapshot("4", 3, status="candidate").settled


def _bare_model(tmp_path, versions: int):
    """A registered model with `versions` versions whose files are never read (no BentoML)."""
    from registry.register import connect

    tracking = tracking_settings(tmp_path)
    client = connect(tracking)
    settings = registry_settings(bento_import=False)
    client.create_registered_model(settings.model_name)
    for _ in range(versions):
        client.create_model_version(settings.model_name, source=str(tmp_path / "not-read"))
    return client, tracking, settings


def _cli(monkeypatch, tracking, settings, *argv) -> int:
    from imgcls.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.resolved_tracking_uri())
    monkeypatch.setenv("IMGCLS_HOME", str(tracking.home))
    monkeypatch.setenv("IMGCLS_REGISTRY_MODEL_NAME", settings.model_name)
    monkeypatch.setenv("IMGCLS_REGISTRY_BENTO_IMPORT", "false")
    monkeypatch.setenv("COLUMNS", "250")
    return main(list(argv))


def _history(client, settings):
    from registry.history import read_history

    return [(m.action, m.from_version, m.to_version, m.by) for m in read_history(client, settings)]


def _champion(client, settings):
    from registry.versions import champion_version

    return champion_version(client, settings)


def test_list_shows_a_hand_move_rollback_records_it_and_goes_back(tmp_path, monkeypatch, capsys):
    from registry.promote import move_alias
    from registry.reconcile import OUTSIDE

    client, tracking, settings = _bare_model(tmp_path, 3)
    move_alias(client, settings, _move("promote", None, "1"))
    move_alias(client, settings, _move("promote", "1", "2"))
    client.set_registered_model_alias(settings.model_name, "champion", "1")  # by hand, as in the UI
    recorded = _history(client, settings)
    capsys.readouterr()

    assert _cli(monkeypatch, tracking, settings, "models", "list") == 0
    out = capsys.readouterr().out
    assert "champion was moved outside imgcls (history: 2, alias: 1)" in out
    assert "not recorded yet" in out
    assert _history(client, settings) == recorded  # a report only reads

    assert _cli(monkeypatch, tracking, settings, "models", "rollback", "--reason", "hand pick was wrong") == 0
    assert "version 1 -> version 2 (rollback: hand pick was wrong)" in capsys.readouterr().out
    assert _champion(client, settings) == "2"
    assert _history(client, settings)[2:] == [
        ("manual", "2", "1", OUTSIDE),
        ("rollback", "1", "2", recorded[0][3]),
    ]
    tags = client.get_model_version(settings.model_name, "1").tags
    assert tags["imgcls.status"] == "promoted"  # it did become champion

    assert _cli(monkeypatch, tracking, settings, "models", "list") == 0
    out = capsys.readouterr().out
    assert "moved outside imgcls" not in out and "alias moved outside the gate" in out


def test_a_hand_removed_alias_is_recorded_and_rollback_refuses(tmp_path, monkeypatch, capsys):
    from registry.promote import move_alias

    client, tracking, settings = _bare_model(tmp_path, 3)
    move_alias(client, settings, _move("promote", None, "1"))
    move_alias(client, settings, _move("promote", "1", "2"))
    client.delete_registered_model_alias(settings.model_name, "champion")
    capsys.readouterr()
    assert _cli(monkeypatch, tracking, settings, "models", "rollback") == 2
    assert "has no champion: nothing to roll back" in capsys.readouterr().out
    assert _history(client, settings)[-1][:3] == ("manual", "2", None)
    description = client.get_registered_model(settings.model_name).description
    assert "**No champion** (the alias was removed outside the gate)." in description
    assert "| 2 → (none) |" in description
    assert (
        _cli(monkeypatch, tracking, settings, "models", "promote", "3", "--force", "--reason", "restore") == 0
    )
    assert _champion(client, settings) == "3"
    assert _history(client, settings)[-1][:3] == ("promote", None, "3")
    assert _cli(monkeypatch, tracking, settings, "models", "rollback") == 2
    assert "first champion" in capsys.readouterr().out  # nothing before a removal is rolled back to
    assert _cli(monkeypatch, tracking, settings, "models", "show", "2") == 0
    assert "(none)" in capsys.readouterr().out  # the removal, in version 2's moves


def test_a_hand_move_during_a_locked_move_is_recorded_before_it(tmp_path):
    """The compare-and-set under the lock records a hand move it finds, then refuses to move
    from a champion that no longer is."""
    from registry.history import AliasMove
    from registry.promote import move_alias
    from registry.steps import Stale, act, read_snapshot

    client, tracking, settings = _bare_model(tmp_path, 3)
    move_alias(client, settings, _move("promote", None, "1"))
    planned_on = read_snapshot(client, settings)
    client.set_registered_model_alias(settings.model_name, "champion", "2")
    planned = AliasMove(action="promote", from_version="1", to_version="3", metric="macro_f1", reason="gate")
    outcome = act(client, tracking, settings, planned_on, planned)
    assert isinstance(outcome, Stale) and outcome.now.champion == "2"
    assert [h[:3] for h in _history(client, settings)] == [("promote", None, "1"), ("manual", "1", "2")]


def _bento_champions(settings) -> list[str]:
    from service.store import champion_entries

    entries = champion_entries(settings.bento_model_name, settings.alias, settings.model_name)
    return [m.info.labels["registry_version"] for m in entries]


@pytest.mark.slow
def test_pipeline_after_a_hand_move_gates_against_the_hand_picked_champion(tmp_path, monkeypatch, capsys):
    """promote v1 and v2 through the gate; move the alias back to v1 by hand;
    the next pipeline records the hand move and gates against v1; rollback then works."""
    from mlflow import MlflowClient

    from imgcls.cli import main
    from registry.history import read_history
    from registry.reconcile import OUTSIDE

    tracking = tracking_settings(tmp_path)
    settings = registry_settings(first_model_floor=0.0)
    data = write_dataset(tmp_path / "shapes")
    for var, value in {
        "MLFLOW_TRACKING_URI": tracking.resolved_tracking_uri(),
        "IMGCLS_HOME": str(tracking.home),
        "IMGCLS_REGISTRY_MODEL_NAME": settings.model_name,
        "IMGCLS_REGISTRY_FIRST_MODEL_FLOOR": "0",
        "IMGCLS_REGISTRY_MARGIN": "-1",  # v1 and v2 pass whatever they score
        "IMGCLS_REGISTRY_MAX_RECALL_DROP": "1",
        "COLUMNS": "250",
    }.items():
        monkeypatch.setenv(var, value)
    quick = ["--backbone", "simple_cnn", "--image-size", "32", "--batch-size", "8", "--no-augment"]
    weak = ["--epochs", "1", "--learning-rate", "1e-7"]
    assert main(["pipeline", "--data", str(data), *quick, *weak]) == 0  # v1
    assert main(["pipeline", "--data", str(data), *quick, *weak]) == 0  # v2
    client = MlflowClient(tracking_uri=tracking.resolved_tracking_uri())
    client.set_registered_model_alias(settings.model_name, "champion", "1")
    capsys.readouterr()

    monkeypatch.setenv("IMGCLS_REGISTRY_MARGIN", "1")  # no gain can pass: v1 stays
    assert main(["pipeline", "--data", str(data), *quick, *weak]) == 3  # v3
    out = capsys.readouterr().out
    assert "candidate v3 vs champion v1" in out, out[-3000:]
    moves = read_history(client, settings)
    assert [(m.action, m.from_version, m.to_version) for m in moves[:3]] == [
        ("promote", None, "1"),
        ("promote", "1", "2"),
        ("manual", "2", "1"),
    ]
    assert moves[2].by == OUTSIDE and moves[2].candidate_metrics and moves[2].champion_metrics
    assert _bento_champions(settings) == ["1"]  # the service's BentoML source follows it too
    assert main(["models", "rollback"]) == 0  # back to the champion before the hand move
    assert _champion(client, settings) == "2" and _bento_champions(settings) == ["2"]
    assert read_history(client, settings)[-1].action == "rollback"


def test_a_promotion_reads_the_alias_twice(tmp_path, monkeypatch):
    """Once for the snapshot it is planned on (which reconcile plans on too), once under the
    lock; the bookkeeping after the move (status, descriptions) knows the champion."""
    from mlflow import MlflowClient

    from registry.promote import force_promote, rollback

    client, tracking, settings = _bare_model(tmp_path, 3)
    force_promote(client, tracking, settings, "1", "set-up", None)
    force_promote(client, tracking, settings, "2", "set-up", None)
    reads = []
    real = MlflowClient.get_model_version_by_alias

    def counted(self, *args, **kwargs):
        reads.append(args)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", counted)
    assert force_promote(client, tracking, settings, "3", "counted", None).passed
    assert len(reads) == 2, reads
    reads.clear()
    assert rollback(client, tracking, settings, "counted").to_version == "2"
    assert len(reads) == 2, reads
    monkeypatch.undo()
    assert _champion(client, settings) == "2"
    assert "**Champion: version 2**" in client.get_registered_model(settings.model_name).description
    assert client.get_model_version(settings.model_name, "2").tags["imgcls.status"] == "promoted"
