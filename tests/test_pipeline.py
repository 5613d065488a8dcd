"""`imgcls pipeline` end to end: real training, real MLflow (SQLite), real BentoML store."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgcls.processes import stop
from tests.registry_fixtures import start_imgcls, tracking_settings, write_dataset

pytestmark = pytest.mark.slow

MODEL = "pipeline-clf"
# The quick, learnable training options (the same flags as `imgcls train`).
QUICK = [
    "--backbone",
    "simple_cnn",
    "--image-size",
    "32",
    "--epochs",
    "6",
    "--batch-size",
    "8",
    "--no-augment",
]
# A deliberately worse run: one epoch at a learning rate too small to learn.
WORSE = ["--epochs", "1", "--learning-rate", "1e-7"]


def _env(root) -> dict[str, str]:
    tracking = tracking_settings(root)
    return {
        "MLFLOW_TRACKING_URI": tracking.resolved_tracking_uri(),
        "IMGCLS_HOME": str(tracking.home),
        "IMGCLS_REGISTRY_MODEL_NAME": MODEL,
        "COLUMNS": "200",
    }


def _pipeline(env: dict[str, str], data, *extra: str) -> int:
    from imgcls.cli import main

    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        return main(["pipeline", "--data", str(data), *QUICK, *extra])


def _state(env):
    """(champion version, alias moves, {version: status}) read back from the store."""
    from mlflow import MlflowClient

    from registry.history import read_history
    from registry.settings import RegistrySettings
    from registry.versions import champion_version

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    settings = RegistrySettings(model_name=MODEL)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    statuses = {str(v.version): v.tags.get("imgcls.status") for v in versions}
    return champion_version(client, settings), read_history(client, settings), statuses


@pytest.fixture(scope="module")
def with_champion(tmp_path_factory):
    """A store where one pipeline run made version 1 champion: (env, data folder)."""
    root = tmp_path_factory.mktemp("pipeline")
    data = write_dataset(root / "shapes")
    env = _env(root)
    assert _pipeline(env, data) == 0
    return env, data


def test_first_pipeline_promotes_and_imports_into_bentoml(with_champion):
    import bentoml

    env, _ = with_champion
    champion, moves, statuses = _state(env)
    assert champion == "1" and statuses == {"1": "promoted"}
    assert [(m.from_version, m.to_version) for m in moves] == [(None, "1")]
    labels = [m.info.labels for m in bentoml.models.list(MODEL)]  # the BentoML name is the model name
    assert [(lb["registry_version"], lb["registered_model"], lb["alias"]) for lb in labels] == [
        ("1", MODEL, "champion")
    ]


def test_worse_config_is_registered_not_promoted_with_exit_code_3(with_champion, capsys):
    env, data = with_champion
    before = _state(env)
    capsys.readouterr()
    assert _pipeline(env, data, *WORSE) == 3
    out = capsys.readouterr().out
    assert "NOT PROMOTED" in out and "below the margin" in out
    assert "candidate v" in out and f"champion v{before[0]}" in out  # the summary table
    champion, moves, statuses = _state(env)
    assert champion == before[0] and moves == before[1]
    assert list(statuses.values()).count("rejected") >= 1


def test_interrupted_pipeline_changes_nothing(with_champion, monkeypatch):
    """Ctrl-C while the gate evaluates the champion: alias and history stay; the new
    version is kept but tagged `interrupted`."""
    import registry.promote

    env, data = with_champion
    before = _state(env)

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(registry.promote, "evaluate_version", interrupt)
    assert _pipeline(env, data) == 130
    champion, moves, statuses = _state(env)
    assert champion == before[0] and moves == before[1]
    new = set(statuses) - set(before[2])
    assert len(new) == 1 and statuses[new.pop()] == "interrupted"


def test_interrupt_after_the_alias_moved_reports_the_promotion(with_champion, monkeypatch, capsys):
    """Ctrl-C lands right after the alias write: exit 0, the new champion stays `promoted`."""
    import os
    import signal

    from mlflow import MlflowClient

    env, data = with_champion
    before = _state(env)
    real = MlflowClient.set_registered_model_alias

    def alias_then_ctrl_c(self, *args, **kwargs):
        real(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", alias_then_ctrl_c)
    # A gate any retrained model passes, so the alias does move.
    lenient = env | {"IMGCLS_REGISTRY_MARGIN": "-1", "IMGCLS_REGISTRY_MAX_RECALL_DROP": "1"}
    capsys.readouterr()
    assert _pipeline(lenient, data) == 0
    out = capsys.readouterr().out
    assert "an interrupt arrived after the alias move completed" in out and "unchanged" not in out
    champion, moves, statuses = _state(env)
    assert champion not in before[2] and statuses[champion] == "promoted"
    assert [(m.from_version, m.to_version) for m in moves[len(before[1]) :]] == [(before[0], champion)]


def test_bad_input_exits_2_naming_the_field_or_path(tmp_path, capsys):
    env = _env(tmp_path)
    assert _pipeline(env, tmp_path / "missing") == 2
    assert f"dataset folder not found: {tmp_path / 'missing'}" in capsys.readouterr().out
    data = write_dataset(tmp_path / "shapes", per_class=3)
    assert _pipeline(env, data, "--epochs", "0") == 2
    assert "epochs" in capsys.readouterr().out
    assert _state(env)[2] == {}  # nothing registered


def test_concurrent_pipelines_leave_a_state_one_of_them_decided(tmp_path):
    """Two real processes pass the gate against "no champion" while the test holds the
    registry lock, so both reach the alias move together. The one that moves second must
    see the new champion, gate again against it, and only then decide."""
    import time

    from registry.lock import file_lock

    data = write_dataset(tmp_path / "shapes")
    env = _env(tmp_path)
    logs = [tmp_path / f"p{i}.log" for i in (1, 2)]
    lock = f"{env['MLFLOW_TRACKING_URI'].removeprefix('sqlite:///')}.{MODEL}.lock"
    with file_lock(Path(lock), timeout_s=10):
        procs = [start_imgcls(["pipeline", "--data", str(data), *QUICK], env, log) for log in logs]
        try:
            _wait_for_line(logs, procs, "taking the registry lock", timeout_s=240)
            time.sleep(1)
        except BaseException:
            for p in procs:
                stop(p)
            raise
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            stop(p)
    outputs = [log.read_text() for log in logs]
    assert sorted(codes) == [0, 3], outputs
    champion, moves, statuses = _state(env)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert [(m.from_version, m.to_version) for m in moves] == [(None, champion)]
    assert sorted(statuses.values()) == ["promoted", "rejected"]
    assert "gate re-run: the champion changed meanwhile" in outputs[loser]
    rejected = next(v for v, s in statuses.items() if s == "rejected")
    assert f"candidate v{rejected} vs champion v{champion}" in outputs[loser]
    assert "first champion" in outputs[winner]


def _wait_for_line(logs, procs, text: str, timeout_s: float) -> None:
    """Until every log contains `text`; fails if a process ends first."""
    import time

    deadline = time.monotonic() + timeout_s
    while not all(text in log.read_text() for log in logs):
        assert all(p.poll() is None for p in procs), [log.read_text()[-3000:] for log in logs]
        assert time.monotonic() < deadline, f"no {text!r} within {timeout_s}s"
        time.sleep(0.5)
