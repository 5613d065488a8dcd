"""Server-side failures still answer JSON: 503 with Retry-After when the model is busy or
the front's decode slots are full."""

from __future__ import annotations

import threading

import aiohttp
import pytest
from bentoml.exceptions import ServiceUnavailable
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.limits import DecodeSlots, Rejected, install_error_handlers


def _app() -> TestClient:
    app = FastAPI()

    @app.get("/overloaded")
    def overloaded():
        raise ServiceUnavailable("process is overloaded")

    @app.get("/connection")
    def connection():
        raise aiohttp.ClientConnectionError("Connector is closed.")

    @app.get("/bug")
    def bug():
        raise RuntimeError("boom")

    install_error_handlers(app)
    return TestClient(app, raise_server_exceptions=False)


def test_model_overload_and_broken_connection_are_503_json():
    client = _app()
    for path in ("/overloaded", "/connection"):
        response = client.get(path)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "busy or restarting" in response.json()["error"]


def test_unexpected_errors_are_json_not_text():
    response = _app().get("/bug")
    assert response.status_code == 500
    assert response.json() == {"error": "internal error: RuntimeError"}


def test_rejected_with_retry_after_sets_the_header():
    app = FastAPI()

    @app.get("/busy")
    def busy():
        raise Rejected(503, "decoding too much", retry_after_s=1)

    install_error_handlers(app)
    response = TestClient(app).get("/busy")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json() == {"error": "decoding too much"}


def test_decode_slots_refuse_quickly_beyond_the_count_and_the_memory_budget():
    slots = DecodeSlots(limit=2, budget_bytes=100, wait_s=0.05)
    with slots.hold(10), slots.hold(10), pytest.raises(Rejected) as refused, slots.hold(1):
        pass
    assert refused.value.status == 503 and refused.value.retry_after_s == 1
    assert "at most 2 at once" in refused.value.message
    with slots.hold(80):
        with pytest.raises(Rejected), slots.hold(30):  # over the budget beside the first
            pass
        with slots.hold(20):  # fits beside it
            pass
    with slots.hold(10**9):  # bigger than the whole budget: runs, alone
        pass


def test_a_waiting_decode_gets_the_slot_freed_within_its_wait():
    slots = DecodeSlots(limit=1, budget_bytes=100, wait_s=5)
    started, release = threading.Event(), threading.Event()

    def first():
        with slots.hold(50):
            started.set()
            release.wait(5)

    worker = threading.Thread(target=first)
    worker.start()
    started.wait(5)
    threading.Timer(0.1, release.set).start()
    with slots.hold(50):  # waits for the first to finish, no 503
        pass
    worker.join()
