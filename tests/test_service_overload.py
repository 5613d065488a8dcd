"""Overload shedding against the real server: beyond a route class's limit a request gets a
503 in the error shape with Retry-After at once, and held /explain requests never hold
/predict. Heatmaps and model calls are held by the IMGCLS_HOOK_HEATMAP / _MODEL_CALL seams,
so nothing depends on timing."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from bentoml.exceptions import ServiceUnavailable

from service.settings import ServiceSettings
from service.shedding import HeatmapLane, heatmap_pause, model_max_concurrency
from tests.service_fixtures import colour_image, encode, tiny_model_server

MAX_EXPLAINS = 2
MAX_REQUESTS = 4
RED = encode(colour_image("red"), "PNG")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_store) -> tuple[str, Path]:
    """A real server (one front) with small limits and held heatmaps / model calls; its URL
    and the folder of its hold files."""
    home = tmp_path_factory.mktemp("overload_home")
    hooks = {"heatmap": f"hold:{home / 'hold-heatmap'}", "model_call": f"hold:{home / 'hold-model'}"}
    limits = {"max_concurrent_explains": MAX_EXPLAINS, "max_concurrent_requests": MAX_REQUESTS}
    with tiny_model_server(home, tiny_store, hooks=hooks, **limits) as srv:
        yield srv.url, home


def explain(url: str) -> httpx.Response:
    return httpx.post(f"{url}/explain", files={"image": ("red.png", RED)}, timeout=60)


def predict(url: str) -> httpx.Response:
    return httpx.post(f"{url}/predict", files={"image": ("red.png", RED)}, timeout=60)


def assert_shed(response: httpx.Response, kind: str) -> None:
    """A 503 in the error shape, with Retry-After and the request ID."""
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    body = response.json()
    assert f"at capacity for {kind} requests" in body["error"]
    assert body["request_id"] == response.headers["x-request-id"]


@pytest.mark.slow
def test_explains_beyond_the_limit_are_shed_at_once_and_predict_still_answers(server):
    url, home = server
    hold = home / "hold-heatmap"
    hold.touch()
    try:
        with ThreadPoolExecutor(MAX_EXPLAINS) as pool:
            held = [pool.submit(explain, url) for _ in range(MAX_EXPLAINS)]
            _wait_in_progress(url, "/explain", MAX_EXPLAINS)  # one computing, one waiting its turn
            with ThreadPoolExecutor(8) as burst:
                shed = list(burst.map(lambda _: explain(url), range(8)))
            answered = [predict(url) for _ in range(3)]  # the heatmap thread is held, not the batches
            assert hold.exists() and not any(f.done() for f in held)  # all of it while still held
            hold.unlink()
            explained = [f.result() for f in held]
    finally:
        hold.unlink(missing_ok=True)
    for response in shed:
        assert_shed(response, "explain")
    assert all(r.status_code == 200 and r.json()["predictions"][0]["label"] == "red" for r in answered)
    assert all(r.status_code == 200 and r.headers["content-type"] == "image/png" for r in explained)


@pytest.mark.slow
def test_predicts_beyond_the_limit_are_shed_at_once(server):
    url, home = server
    hold = home / "hold-model"
    hold.touch()
    try:
        with ThreadPoolExecutor(MAX_REQUESTS) as pool:
            held = [pool.submit(predict, url) for _ in range(MAX_REQUESTS)]
            _wait_in_progress(url, "/classify", MAX_REQUESTS)
            shed = [predict(url) for _ in range(3)]
            probes = [httpx.get(f"{url}/livez"), httpx.get(f"{url}/readyz")]
            assert hold.exists() and not any(f.done() for f in held)
            hold.unlink()
            answered = [f.result() for f in held]
    finally:
        hold.unlink(missing_ok=True)
    for response in shed:
        assert_shed(response, "predict")
    assert [p.status_code for p in probes] == [200, 200]  # probes are never shed
    assert all(r.status_code == 200 for r in answered)


def test_the_heatmap_lane_runs_one_at_a_time_and_refuses_beyond_its_queue():
    lane = HeatmapLane(max_waiting=2)
    running, most = 0, 0

    def work(i: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        time.sleep(0.05)
        running -= 1
        return i

    async def burst() -> list:
        return await asyncio.gather(*(lane.run(work, i) for i in range(5)), return_exceptions=True)

    results = asyncio.run(burst())
    assert results[:3] == [0, 1, 2] and most == 1  # one running, two waiting, in order
    assert all(isinstance(r, ServiceUnavailable) for r in results[3:])


def test_the_model_backstop_covers_what_the_fronts_may_send():
    settings = ServiceSettings(
        front_workers=3, model_workers=2, max_concurrent_requests=10, max_concurrent_explains=2
    )
    # BentoML divides max_concurrency among the model workers: each still takes all 3 x 12.
    assert model_max_concurrency(settings) // settings.model_workers >= 3 * (10 + 2)


MODEL_SERVICE = 'service_name="imgcls-model"'


def _wait_in_progress(url: str, endpoint: str, n: int, timeout_s: float = 60) -> None:
    """Until the model service has `n` calls of `endpoint` in progress (held or queued)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = httpx.get(f"{url}/metrics").text.splitlines()
        in_progress = sum(
            float(line.rsplit(" ", 1)[1])
            for line in lines
            if "request_in_progress{" in line and f'endpoint="{endpoint}"' in line and MODEL_SERVICE in line
        )
        if in_progress >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{n} {endpoint} calls never reached the model process")


def test_heatmaps_give_way_to_predictions_but_run_back_to_back_alone():
    assert heatmap_pause(0.05, predicting=False) == 0.0
    # While predictions run, a heatmap of 50 ms closes the lane for 200 ms: a 20% share.
    assert heatmap_pause(0.05, predicting=True, share=0.2) == pytest.approx(0.2)
    assert heatmap_pause(0.05, predicting=True, share=1.0) == 0.0


def test_the_heatmap_lane_pauses_only_while_predictions_run():
    now = [0.0]
    predicting = [True]

    def work() -> None:
        now[0] += 0.1  # each heatmap "takes" 100 ms on the fake clock

    async def sleep_on_the_clock(seconds: float) -> None:
        now[0] += seconds

    lane = HeatmapLane(
        max_waiting=4, predicting=lambda: predicting[0], clock=lambda: now[0], sleep=sleep_on_the_clock
    )

    async def two() -> None:
        await lane.run(work)
        await lane.run(work)

    asyncio.run(two())
    assert now[0] == pytest.approx(0.1 + 0.4 + 0.1)  # the pause after the first: 0.1 x 0.8/0.2
    predicting[0] = False
    start = now[0]
    asyncio.run(two())
    assert now[0] - start == pytest.approx(0.2)  # alone, back to back
