"""On the team stack (PostgreSQL, S3, `mlflow server --app-name basic-auth`): a running
`imgcls serve --source mlflow`, logged in as the read-only classifier user, follows a
promotion, a rollback, a move made by hand in the MLflow UI's way, and the rollback after
it, while clients keep asking; no request fails."""

from __future__ import annotations

import pytest

from imgcls.processes import free_port, stop, wait_ready
from tests.registry_fixtures import quick_config, registry_settings, start_imgcls, write_dataset
from tests.service_fixtures import Clients
from tests.test_team_stack import _tracking, as_client

pytest_plugins = ["tests.stack"]
pytestmark = pytest.mark.slow
POLL_S = 0.5


def test_a_replica_follows_promotion_rollback_and_a_hand_move(team_stack, tmp_path):
    from mlflow import MlflowClient

    from registry import promote
    from registry.history import read_history
    from registry.pipeline import run_pipeline
    from registry.register import register_candidate

    settings = registry_settings(bento_import=False)
    tracking = _tracking(team_stack, tmp_path, f"follow-{settings.model_name}")
    with as_client(team_stack, tmp_path):
        admin = MlflowClient(tracking_uri=team_stack.url, registry_uri=team_stack.url)
        outcome = run_pipeline(quick_config(write_dataset(tmp_path / "shapes")), tracking, settings)
        first, result = outcome.version, outcome.result
        second = register_candidate(settings, result.model_uri, result.run_id, result.card, result.metrics)
        port = free_port()
        env = team_stack.process_env(
            reader=True,
            IMGCLS_HOME=str(tmp_path / "serve-home"),
            BENTOML_HOME=str(tmp_path / "bento"),
            KERAS_HOME=str(tmp_path / "keras"),
        )
        args = ["serve", "--source", "mlflow", "--model-name", settings.model_name, "--port", str(port)]
        server = start_imgcls([*args, "--poll-interval", str(POLL_S)], env, tmp_path / "serve.log")
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(f"{url}/readyz", server, tmp_path / "serve.log", timeout_s=180)
            with Clients(url) as clients:
                clients.wait_for(first)
                promote.force_promote(admin, tracking, settings, second, "a promotion to follow", scan=None)
                clients.wait_for(second)
                promote.rollback(admin, tracking, settings, "a rollback to follow")
                clients.wait_for(first)
                admin.set_registered_model_alias(settings.model_name, "champion", second)  # by hand
                clients.wait_for(second)
                promote.rollback(admin, tracking, settings, "back from the hand move")
                clients.wait_for(first)
            moves = read_history(admin, settings)
        finally:
            stop(server, port=port)
    assert clients.failures == [], clients.failures[:5]
    assert len(clients.answers) > 30
    assert [(m.action, m.to_version) for m in moves] == [
        ("promote", first),
        ("promote", second),
        ("rollback", first),
        ("manual", second),
        ("rollback", first),
    ]
