"""Server-side failures still answer JSON: 503 with Retry-After when the model is busy."""

from __future__ import annotations

import aiohttp
from bentoml.exceptions import ServiceUnavailable
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.limits import install_error_handlers


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
