"""Request guards: JSON errors for client mistakes, the byte limit (413), and a bound on the
decodes running at once in one model process and the memory they hold (503)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from starlette.responses import JSONResponse

from service.errors import current_request_id

Scope = dict[str, Any]

logger = logging.getLogger(__name__)


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """The service's one error shape: `{"error": reason}` (service.errors adds the
    request ID on the way out)."""
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


class Rejected(Exception):
    """A client mistake, answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after_s = status, message, retry_after_s


class DecodeSlots:
    """At most `limit` image decodes at once in this process, holding at most
    `budget_bytes` between them; beyond, a quick 503 with Retry-After.

    A decode's memory grows with the image, not the upload (a 500 KB PNG can hold 40 MP,
    160 MB once decoded), so each decode reserves its cost, read from the header
    (`imgcls.images.decode_cost`): many small images run together, big ones one or two at
    a time. A decode costing more than the whole budget runs alone. A request waits at most
    `wait_s` for room (small images take milliseconds), then gets the 503.
    """

    def __init__(self, limit: int, budget_bytes: int, wait_s: float) -> None:
        self.limit, self.budget_bytes, self.wait_s = limit, budget_bytes, wait_s
        self._room = threading.Condition()
        self._running = self._reserved = 0

    @contextlib.contextmanager
    def hold(self, cost_bytes: int, since: float | None = None) -> Iterator[None]:
        """Room for one decode of `cost_bytes` during the block; raises Rejected(503).
        `since`: when the decode was asked for (monotonic), if it waited before this call."""
        cost = min(cost_bytes, self.budget_bytes)
        deadline = (time.monotonic() if since is None else since) + self.wait_s
        with self._room:
            while self._running >= self.limit or self._reserved + cost > self.budget_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Rejected(503, self._busy(), retry_after_s=1)
                self._room.wait(left)
            self._running, self._reserved = self._running + 1, self._reserved + cost
        try:
            yield
        finally:
            with self._room:
                self._running, self._reserved = self._running - 1, self._reserved - cost
                self._room.notify_all()

    def _busy(self) -> str:
        mib = self.budget_bytes // 2**20
        return f"the server is busy decoding images (at most {self.limit} at once, {mib} MiB); try again"


def return_freed_memory_to_the_system() -> None:
    """Serve big allocations (decoded images) from mmap, so freeing one gives it back.

    glibc raises its mmap threshold after the first big free (up to 32 MB), and Pillow
    allocates images in 16 MB blocks: without this, each worker thread's malloc arena keeps
    the largest image it ever decoded. Fixing the threshold turns that adjustment off.
    A no-op where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # glibc's mallopt parameter number
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(m_mmap_threshold, 1 << 20)


def install_error_handlers(app: Any) -> None:
    """Map `Rejected`, FastAPI's request validation errors and the framework's own HTTP
    errors (404, 405, multipart parse errors) to JSON answers in the error shape, the
    model's refusals to 503, and anything unexpected to a 500 (UnexpectedErrorMiddleware)."""
    from bentoml.exceptions import BentoMLException
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def rejected(_request: Any, exc: Rejected) -> JSONResponse:
        response = error_response(exc.status, exc.message)
        if exc.retry_after_s is not None:
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    async def invalid(_request: Any, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _describe(exc.errors()), detail=_jsonable(exc.errors()))

    async def busy(_request: Any, exc: Exception) -> JSONResponse:
        response = error_response(503, f"the model is busy or restarting, try again: {type(exc).__name__}")
        response.headers["Retry-After"] = "1"
        return response

    async def http_error(request: Any, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, _http_error_text(request, exc), headers=exc.headers)

    async def model_error(request: Any, exc: BentoMLException) -> JSONResponse:
        if exc.error_code.value in (429, 503):  # the model process sheds load: try again
            return await busy(request, exc)
        logger.error("the model process answered %d: %s", exc.error_code.value, exc)
        return error_response(500, f"the model process failed: {type(exc).__name__}")

    app.add_exception_handler(Rejected, rejected)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(BentoMLException, model_error)
    for unavailable in _unavailable_errors():
        app.add_exception_handler(unavailable, busy)
    app.add_middleware(UnexpectedErrorMiddleware)


def _unavailable_errors() -> tuple[type[Exception], ...]:
    """The model process refused (overload) or its connection broke: a 503, not a 500."""
    import aiohttp
    from bentoml.exceptions import ServiceUnavailable

    return (ServiceUnavailable, aiohttp.ClientConnectionError)


def _http_error_text(request: Any, exc: Any) -> str:
    """The reason of a framework HTTP error, naming the route for 404 and 405."""
    if exc.status_code == 404:
        return f"no route {request.url.path}"
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return f"method {request.method} is not allowed on {request.url.path} (allowed: {allowed})"
    return str(exc.detail)


def _describe(errors: list[dict]) -> str:
    """One line for validation errors, e.g. `missing form field 'image'`."""
    parts = []
    for err in errors:
        field = ".".join(str(p) for p in err.get("loc", ())[1:]) or "request"
        if err.get("type") == "missing":
            parts.append(f"missing form field {field!r} (send the file as multipart field {field!r})")
        else:
            parts.append(f"invalid field {field!r}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _jsonable(errors: list[dict]) -> list[dict]:
    """Validation errors without their inputs (an upload is not JSON)."""
    keep = ("type", "loc", "msg")
    return [{k: err[k] for k in keep if k in err} for err in errors]


class UnexpectedErrorMiddleware:
    """ASGI middleware: an unexpected exception (a bug) becomes a logged 500 in the error
    shape, and is not raised further, so the client's keep-alive connection stays usable.

    Starlette's handler for `Exception` answers, then re-raises, and uvicorn closes the
    connection: the client's next request on it failed with a reset.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            logger.exception("request %s failed", current_request_id(), exc_info=exc)
            if started:  # half an answer is out: closing the connection is all that is left
                raise
            await error_response(500, f"internal error: {type(exc).__name__}")(scope, receive, send)


class BodyLimitMiddleware:
    """ASGI middleware: a body over `max_bytes` gets a 413 before it is parsed.

    A declared Content-Length is checked up front; a chunked body is counted as it
    arrives and, once over the limit, the app's answer is replaced by the 413.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._reject(scope, receive, send, declared.isdigit())
        state = {"received": 0, "over": False}

        async def counting_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["over"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if not state["over"]:
                await send(message)
            elif message["type"] == "http.response.start":
                await self._too_large()(scope, _no_body, send)

        await self.app(scope, counting_receive, guarded_send)

    async def _reject(self, scope: Scope, receive: Any, send: Any, numeric: bool) -> None:
        if not numeric:
            return await error_response(400, "invalid Content-Length header")(scope, receive, send)
        await self._drain(receive)
        await self._too_large()(scope, receive, send)

    async def _drain(self, receive: Any) -> None:
        """Read and drop some of the body, so the client gets to read the 413.

        A client still writing its upload when the server closes sees a reset instead of
        the answer; twice the limit is enough to let ordinary clients finish.
        """
        seen = 0
        while seen <= 2 * self.max_bytes:
            message = await receive()
            seen += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    def _too_large(self) -> JSONResponse:
        return error_response(413, f"request body is over the limit of {self.max_bytes} bytes")


async def _no_body() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}
