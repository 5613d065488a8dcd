"""`imgcls ui` for real: an `mlflow server` process on a free port, a pipeline run through
it over HTTP, and Debian's headless chromium reading the React UI's rendered DOM."""

from __future__ import annotations

import re
import threading
import time

import pytest

from imgcls.processes import free_port, stop, wait_ready
from tests.mlflow_pages import check_registry_pages, page_dom, page_text, table_rows
from tests.registry_fixtures import (
    quick_config,
    registry_settings,
    start_imgcls,
    tracking_settings,
    write_dataset,
)

pytestmark = pytest.mark.slow
EXPERIMENT = "ui-test-experiment"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`imgcls ui` on a fresh SQLite store, and one pipeline run through it over HTTP."""
    from imgcls.settings import TrackingSettings
    from registry.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("ui")
    port = free_port()
    server_side = tracking_settings(root)
    env = {"MLFLOW_TRACKING_URI": server_side.resolved_tracking_uri(), "IMGCLS_HOME": str(server_side.home)}
    process = start_imgcls(["ui", "--port", str(port)], env, root / "ui.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/health", process, root / "ui.log", timeout_s=90)
        tracking = TrackingSettings(
            home=root / "client", MLFLOW_TRACKING_URI=url, MLFLOW_EXPERIMENT_NAME=EXPERIMENT
        )
        settings = registry_settings(model_name="ui-clf")
        outcome = run_pipeline(quick_config(write_dataset(root / "shapes")), tracking, settings)
        yield {"url": url, "root": root, "tracking": tracking, "settings": settings, "outcome": outcome}
    finally:
        stop(process, port=port)
        _forget_the_server()


def _forget_the_server() -> None:
    """`open_store` pointed MLflow (and MLFLOW_REGISTRY_URI) at the server just stopped:
    later tests in this process must not retry against a dead port."""
    import os

    import mlflow

    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)


def test_ui_prints_its_url_and_serves_the_store(served):
    log = (served["root"] / "ui.log").read_text()
    assert f"MLflow UI: {served['url']}" in log


def test_pipeline_through_a_real_mlflow_server(served):
    from mlflow import MlflowClient

    from registry.history import read_history
    from registry.lock import LEASE_TAG

    outcome, settings = served["outcome"], served["settings"]
    assert outcome.decision.passed and outcome.exit_code == 0
    client = MlflowClient(tracking_uri=served["url"], registry_uri=served["url"])
    assert str(client.get_model_version_by_alias(settings.model_name, "champion").version) == outcome.version
    assert [m.to_version for m in read_history(client, settings)] == [outcome.version]
    assert LEASE_TAG not in client.get_registered_model(settings.model_name).tags  # lease released
    assert client.get_run(outcome.result.run_id).info.artifact_uri.startswith("mlflow-artifacts:")


def test_remote_lease_admits_one_holder_at_a_time(served):
    from mlflow import MlflowClient

    from registry.lock import tag_lease

    client = MlflowClient(tracking_uri=served["url"], registry_uri=served["url"])
    held: list[tuple[float, float]] = []

    def hold():
        with tag_lease(client, served["settings"]):
            start = time.monotonic()
            time.sleep(0.5)
            held.append((start, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(held) == 3
    spans = sorted(held)
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:], strict=False)), spans


@pytest.mark.browser
def test_browser_finds_experiment_run_and_champion(served, tmp_path):
    from tests.browser import require_chromium

    require_chromium()
    import mlflow

    url, outcome = served["url"], served["outcome"]
    run = mlflow.MlflowClient(tracking_uri=url).get_run(outcome.result.run_id)
    assert EXPERIMENT in page_text(f"{url}/#/experiments", tmp_path / "p1")
    runs_page = page_text(f"{url}/#/experiments/{run.info.experiment_id}/runs", tmp_path / "p2")
    assert run.info.run_name in runs_page
    model_page = page_text(f"{url}/#/models/{served['settings'].model_name}", tmp_path / "p3")
    row = re.search(rf"Version {outcome.version} (.*?)(Version \d|Previous)", model_page)
    assert row, model_page[:2000]
    assert "@ champion" in row.group(1) and outcome.result.run_id in row.group(1)


@pytest.mark.browser
def test_browser_shows_the_model_description_and_the_version_card(served, tmp_path):
    from tests.browser import require_chromium

    require_chromium()
    check_registry_pages(served["url"], served["settings"].model_name, tmp_path / "pipeline")


@pytest.mark.browser
def test_browser_shows_a_hand_move_and_the_rollback_after_it(served, tmp_path):
    """Through the server (so under the remote lease): v1, v2 forced, the alias moved back to
    v1 by hand, then `rollback`: it records the hand move and goes back to v2."""
    from mlflow import MlflowClient

    from registry.promote import force_promote, rollback
    from registry.reconcile import OUTSIDE
    from registry.register import register_candidate
    from tests.browser import require_chromium

    require_chromium()
    url, result = served["url"], served["outcome"].result
    settings = registry_settings(model_name="ui-hand-moves", bento_import=False)
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    for reason in ("first", "second"):
        version = register_candidate(settings, result.model_uri, result.run_id, result.card, result.metrics)
        force_promote(client, served["tracking"], settings, version, reason, None)
    client.set_registered_model_alias(settings.model_name, "champion", "1")
    back = rollback(client, served["tracking"], settings, "the hand pick was wrong")
    assert (back.from_version, back.to_version) == ("1", "2")

    check_registry_pages(url, settings.model_name, tmp_path)
    rows = table_rows(page_dom(f"{url}/#/models/{settings.model_name}", tmp_path / "moves"))
    moves = {row[0]: row for row in rows if len(row) == 8}  # the moves table: number -> cells
    assert moves["3"][2:5] == ["manual", "2 → 1", OUTSIDE], rows
    assert moves["3"][7] == "alias moved outside the gate"
    assert moves["4"][2:4] == ["rollback", "1 → 2"] and moves["4"][7] == "the hand pick was wrong"
