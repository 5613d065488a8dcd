"""Server-side failures still answer JSON: 503 with Retry-After when the model is busy or
the decode slots are full."""

from __future__ import annotations

import asyncio
import threading
import time
from http import HTTPStatus

import aiohttp
import pytest
from bentoml.exceptions import BentoMLException, ServiceUnavailable
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.limits import DecodeSlots, Rejected, install_error_handlers
from service.link import RemoteLink
from service.uploads import HeldUploads, refuse


def _app() -> TestClient:
    app = FastAPI()

    @app.get("/overloaded")
    def overloaded():
        raise ServiceUnavailable("process is overloaded")

    @app.get("/connection")
    def connection():
        raise aiohttp.ClientConnectionError("Connector is closed.")

    @app.get("/shed")
    def shed():  # BentoML's max_concurrency on the model service answered 429
        raise BentoMLException("Too many requests", error_code=HTTPStatus.TOO_MANY_REQUESTS)

    @app.get("/model-bug")
    def model_bug():
        raise BentoMLException(
            "An unexpected error has occurred", error_code=HTTPStatus.INTERNAL_SERVER_ERROR
        )

    @app.get("/bug")
    def bug():
        raise RuntimeError("boom")

    install_error_handlers(app)
    return TestClient(app, raise_server_exceptions=False)


def test_model_overload_and_broken_connection_are_503_json():
    client = _app()
    for path in ("/overloaded", "/connection", "/shed"):
        response = client.get(path)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "busy or restarting" in response.json()["error"]


class _Proxy:
    """A model-process client whose first calls fail as a pooled connection closed under them."""

    def __init__(self, failures: list[Exception]):
        self.failures, self.calls = failures, 0
        self.to_async = self

    async def classify(self, images, k):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return [{"label": "red"}] * len(images)


def test_a_connection_closed_as_it_is_reused_is_retried_once():
    # The keep-alive race: the model process closes an idle connection (uvicorn, 5 s) the
    # front's pool still holds (aiohttp, 15 s). Answered on a fresh connection, not a 503.
    proxy = _Proxy([aiohttp.ServerDisconnectedError()])
    assert asyncio.run(RemoteLink(proxy).classify([b"jpeg"], 3)) == [{"label": "red"}] and proxy.calls == 2
    proxy = _Proxy([aiohttp.ClientOSError(104, "Connection reset by peer")] * 2)
    with pytest.raises(aiohttp.ClientOSError):  # twice: the model process is down (503)
        asyncio.run(RemoteLink(proxy).classify([b"jpeg"], 3))
    assert proxy.calls == 2


def test_unexpected_errors_are_json_not_text():
    response = _app().get("/bug")
    assert response.status_code == 500
    assert response.json() == {"error": "internal error: RuntimeError"}
    failed = _app().get("/model-bug")
    assert failed.status_code == 500
    assert failed.json() == {"error": "the model process failed: BentoMLException"}


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


def test_a_decode_that_waited_for_a_thread_counts_that_wait():
    slots = DecodeSlots(limit=1, budget_bytes=100, wait_s=5)
    late = time.monotonic() - 6  # asked for 6 s ago: its 5 s are over, and no room: 503 at once
    with slots.hold(50), pytest.raises(Rejected), slots.hold(50, since=late):
        pass
    with slots.hold(50, since=time.monotonic() - 6):  # room: it runs, however long it waited
        pass


def test_uploads_held_by_the_model_process_stay_within_their_budget():
    held = HeldUploads(budget_bytes=100)
    with held.hold(60), pytest.raises(Rejected) as refused, held.hold(50):
        pass
    assert refused.value.status == 503 and refused.value.retry_after_s == 1
    with held.hold(60), held.hold(40):  # fits beside it
        pass
    with held.hold(10**9):  # bigger than the budget: held alone
        pass
    assert held.held_bytes == 0


def test_the_model_process_refusals_reach_the_client_as_they_were_made():
    refuse({"predictions": []}, "image", "a.png")  # an answer: nothing raised
    with pytest.raises(Rejected) as bad:
        refuse({"error": "image is truncated", "status": 400, "retry_after_s": None}, "image 1", "a.png")
    assert (bad.value.status, bad.value.message) == (400, "image 1 (a.png): image is truncated")
    with pytest.raises(Rejected) as busy:  # the server's state, not the upload's: no file named
        refuse({"error": "busy decoding", "status": 503, "retry_after_s": 1}, "image", "a.png")
    assert (busy.value.status, busy.value.message, busy.value.retry_after_s) == (503, "busy decoding", 1)


def test_a_500_keeps_the_keep_alive_connection(tmp_path):
    """Real uvicorn, one raw socket: a request after a 500 is answered on the same connection."""
    import socket

    import uvicorn

    from imgcls.processes import free_port

    app = FastAPI()

    @app.get("/bug")
    def bug():
        raise RuntimeError("boom")

    @app.get("/ok")
    def ok():
        return {"ok": True}

    install_error_handlers(app)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_listening(port)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            first = _exchange(sock, "/bug")
            second = _exchange(sock, "/ok")
    finally:
        server.should_exit = True
        thread.join(10)
    assert first.startswith(b"HTTP/1.1 500") and b'"internal error: RuntimeError"' in first
    assert second.startswith(b"HTTP/1.1 200") and second.endswith(b'{"ok":true}')


def _exchange(sock, path: str) -> bytes:
    """Send one keep-alive GET and read its whole answer (headers and Content-Length body)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the answer to {path}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed during the answer to {path}"
        body += chunk
    return head + b"\r\n\r\n" + body


def _wait_listening(port: int, timeout_s: float = 10) -> None:
    import time

    from imgcls.processes import port_in_use

    deadline = time.monotonic() + timeout_s
    while not port_in_use(port):
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)


def _shaped_app() -> TestClient:
    """A Starlette app like BentoML's (plain-text errors), wrapped in ErrorShapeMiddleware."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from service.errors import ErrorShapeMiddleware

    async def bug(_request):
        raise RuntimeError("boom")

    async def teapot(_request):
        return PlainTextResponse("short and stout", status_code=418)

    async def big(_request):
        return PlainTextResponse("x" * 100_000, status_code=400)

    routes = [
        Route("/bug", bug),
        Route("/teapot", teapot),
        Route("/big", big),
        Route("/ok", teapot, methods=["PUT"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(ErrorShapeMiddleware)])
    return TestClient(app, raise_server_exceptions=False)


def test_error_shape_middleware_rewrites_plain_errors_and_names_the_route():
    client = _shaped_app()
    missing = client.get("/nope", headers={"X-Request-ID": "abc.123"})
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "abc.123"
    assert missing.json() == {"error": "not found: GET /nope", "request_id": "abc.123"}
    wrong = client.get("/ok")
    assert wrong.status_code == 405 and wrong.json()["error"] == "method not allowed: GET /ok (allowed: PUT)"
    teapot = client.get("/teapot")
    assert teapot.json() == {"error": "short and stout", "request_id": teapot.headers["x-request-id"]}


def test_error_shape_middleware_turns_an_escaped_exception_into_a_500_and_lets_big_bodies_through():
    client = _shaped_app()
    bug = client.get("/bug")
    assert bug.status_code == 500
    assert bug.json() == {"error": "internal error: RuntimeError", "request_id": bug.headers["x-request-id"]}
    big = client.get("/big")
    assert big.status_code == 400 and big.text == "x" * 100_000  # not an error text: passed on
    assert client.head("/nope").status_code == 404


def test_framework_http_errors_use_the_error_shape():
    app = FastAPI()

    @app.post("/predict")
    def predict():
        return {}

    install_error_handlers(app)
    response = TestClient(app).get("/predict")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json() == {"error": "method GET is not allowed on /predict (allowed: POST)"}


def test_a_request_past_its_deadline_gets_a_504_in_the_error_shape():
    import asyncio

    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from service.errors import ErrorShapeMiddleware
    from service.shedding import DeadlineMiddleware

    async def slow(_request):
        await asyncio.sleep(5)
        return PlainTextResponse("late")

    async def quick(_request):
        return PlainTextResponse("ok")

    middleware = [Middleware(ErrorShapeMiddleware), Middleware(DeadlineMiddleware, timeout_s=0.2)]
    app = Starlette(routes=[Route("/slow", slow), Route("/quick", quick)], middleware=middleware)
    client = TestClient(app)
    late = client.get("/slow")
    assert late.status_code == 504
    assert late.json() == {
        "error": "no answer within 0.2 s; try again later",
        "request_id": late.headers["x-request-id"],
    }
    assert client.get("/quick").text == "ok"
