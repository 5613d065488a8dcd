"""One error shape for everything the HTTP front answers, and a request ID on every answer.

`ErrorShapeMiddleware` wraps the whole BentoML app of the front (its own routes such as
/livez, /metrics and /docs, and the FastAPI app mounted at /), so it sees every answer
the application sends, whoever made it:

- each request gets an ID: the client's `X-Request-ID` when it is sane, else the request
  ID BentoML's tracing gave it (its span ID), else a random one. It goes back in the
  `X-Request-ID` header of every answer, in the body of every error, and in the log line
  each error gets (logger `service.errors`);
- an error answer (status >= 400) that is not already `{"error": ...}` JSON (Starlette's
  plain-text 404 and 405 of BentoML's routes, `{"detail": ...}` from a framework) is
  rewritten into it; one that is gets `request_id` added;
- an exception that escapes the app becomes a logged 500 in the same shape.

Malformed HTTP that the server's parser (uvicorn, httptools) refuses never reaches an
application: those answers are uvicorn's own plain-text 400s.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid
from http import HTTPStatus
from typing import Any

from starlette.datastructures import MutableHeaders

Scope = dict[str, Any]

logger = logging.getLogger(__name__)
REQUEST_ID_HEADER = "X-Request-ID"
# A client's own ID is kept if it could not garble a log line or a header: 1-128 of
# these characters (UUIDs, hex trace IDs, ULIDs and dotted names all fit).
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")
# Error bodies are short; anything longer is passed on unchanged rather than held in memory.
MAX_REWRITTEN_BODY = 64 * 1024
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("imgcls_request_id", default=None)


def current_request_id() -> str | None:
    """The ID of the request being answered in this context (None outside a request)."""
    return _request_id.get()


def request_id_for(scope: Scope) -> str:
    """The client's sane `X-Request-ID`, else BentoML's request ID, else a random one."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            sent = value.decode("latin-1")
            if SANE_REQUEST_ID.fullmatch(sent):
                return sent
    return _bentoml_request_id() or uuid.uuid4().hex


def _bentoml_request_id() -> str | None:
    """BentoML's request ID (the span ID its OpenTelemetry middleware set), as it formats it."""
    try:
        from bentoml._internal.context import trace_context
    except ImportError:  # pragma: no cover - bentoml is a dependency of the service
        return None
    request_id = trace_context.request_id
    return None if not request_id else format(request_id, "016x")


def error_body(status: int, body: bytes, content_type: str, request_id: str, where: str = "") -> bytes:
    """`body` of an error answer in the service's shape: `{"error": ..., "request_id": ...}`.

    JSON with `error` keeps its fields; `{"detail": ...}` becomes the error text; plain
    text (or nothing) becomes the error, or the status's reason phrase. `where`
    ("GET /path (allowed: ...)") names the route in a bare 404 or 405."""
    data: Any = None
    if "json" in content_type:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
    if isinstance(data, dict) and "error" in data:
        shaped = dict(data)
    elif isinstance(data, dict) and "detail" in data:
        detail = data["detail"]
        shaped = {"error": detail if isinstance(detail, str) else json.dumps(detail)}
    else:
        text = body.decode("utf-8", "replace").strip()
        shaped = {"error": text or _reason(status)}
    if where and shaped["error"] == _reason(status) and status in (404, 405):
        shaped["error"] = f"{_reason(status).lower()}: {where}"
    shaped["request_id"] = request_id
    return json.dumps(shaped).encode()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


class ErrorShapeMiddleware:
    """ASGI middleware: a request ID on every answer and every error in the error shape
    (see the module docstring). Outermost of the service's own middlewares."""

    def __init__(self, app: Any) -> None:
        self.app = app
        # The servers' root logger is at WARNING; a 4xx is worth an INFO line with its ID.
        logger.setLevel(logging.INFO)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = request_id_for(scope)
        token = _request_id.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        answer = _ShapedAnswer(scope, send, request_id)
        try:
            await self.app(scope, receive, answer.send)
        except Exception as exc:
            logger.exception("request %s failed: %s %s", request_id, scope.get("method"), scope.get("path"))
            if answer.started:  # half an answer is out: closing the connection is all that is left
                raise
            await answer.internal_error(exc)
        finally:
            _request_id.reset(token)


class _ShapedAnswer:
    """The `send` of one request: adds the request ID header, holds an error answer until
    its body is complete, then sends it in the error shape."""

    def __init__(self, scope: Scope, send: Any, request_id: str) -> None:
        self.scope, self._send, self.request_id = scope, send, request_id
        self.started = False  # whether the client got the start of an answer
        self._start: dict | None = None  # a held error answer's start message
        self._body = b""

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(raw=list(message.get("headers", [])))
            headers[REQUEST_ID_HEADER] = self.request_id
            message = {**message, "headers": headers.raw}
            if message["status"] >= 400 and self.scope.get("method") != "HEAD":
                self._start, self._body = message, b""
                return
            return await self._send_start(message)
        if message["type"] != "http.response.body" or self._start is None:
            return await self._send(message)
        self._body += message.get("body", b"")
        if len(self._body) > MAX_REWRITTEN_BODY:  # not an error text: pass it on as it is
            start, self._start = self._start, None
            await self._send_start(start)
            return await self._send({**message, "body": self._body})
        if not message.get("more_body", False):
            await self._send_shaped()

    async def _send_shaped(self) -> None:
        start, self._start = self._start, None
        headers = MutableHeaders(raw=start["headers"])
        status = start["status"]
        where = f"{self.scope.get('method')} {self.scope.get('path')}"
        if "allow" in headers:
            where += f" (allowed: {headers['allow']})"
        body = error_body(status, self._body, headers.get("content-type", ""), self.request_id, where)
        headers["content-type"] = "application/json"
        headers["content-length"] = str(len(body))
        self._log(status, body)
        await self._send_start({**start, "headers": headers.raw})
        await self._send({"type": "http.response.body", "body": body})

    async def _send_start(self, message: dict) -> None:
        self.started = True
        await self._send(message)

    def _log(self, status: int, body: bytes) -> None:
        error = json.loads(body).get("error")
        level = logging.ERROR if status >= 500 else logging.INFO
        method, path = self.scope.get("method"), self.scope.get("path")
        logger.log(level, "request %s: %s %s -> %d %s", self.request_id, method, path, status, error)

    async def internal_error(self, exc: Exception) -> None:
        """Answer a 500 in the error shape (nothing was sent yet)."""
        body = json.dumps({"error": f"internal error: {type(exc).__name__}"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await self.send({"type": "http.response.start", "status": 500, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})
