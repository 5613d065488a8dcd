"""Overload shedding: a bound on the requests each route class runs at once, in the HTTP
front and in the model process, and a quick 503 with Retry-After beyond it.

Front (`RouteLimitMiddleware`): each front process counts its running requests per class,
`predict` (/predict, /predict_batch, /metadata: they wait on the model's batches) and
`explain` (/explain: one Grad-CAM each, far slower than a prediction). A class at its
limit answers the next request at once with 503 `{"error": ...}` and `Retry-After`, so
a burst of /explain can take neither /predict's slots nor the front's worker threads.
BentoML's own `max_concurrency` is not used in the front: one limit for every route, a 429
without Retry-After, and the limit divided among the workers.

Model (`HeatmapLane`): heatmaps run one at a time on a thread of their own, and wait for
it without holding a thread, so the classify batches keep BentoML's worker thread whatever
number of /explain requests are queued. Both share the same cores, though: while
predictions are running, the lane pauses after each heatmap so that heatmaps take at most
`HEATMAP_SHARE` of the model's time (`heatmap_pause`); with no predictions it runs them
back to back. BentoML's `max_concurrency` on the model service
is only a backstop sized to what the fronts may send (`model_max_concurrency`).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from service.limits import error_response
from service.settings import ServiceSettings

Scope = dict[str, Any]
T = TypeVar("T")
# Which class each public route counts against (POST, except /metadata).
ROUTE_CLASSES = {
    ("POST", "/predict"): "predict",
    ("POST", "/predict_batch"): "predict",
    ("GET", "/metadata"): "predict",
    ("POST", "/explain"): "explain",
}
# Seconds a shed client is told to wait: a batch or a heatmap takes well under that.
RETRY_AFTER_S = 1
# The most of the model process's time heatmaps take while predictions run (see heatmap_pause).
HEATMAP_SHARE = 0.2
# Predictions count as running while a batch ran this recently (the gaps between the batches
# of closed-loop clients are shorter).
PREDICTING_WITHIN_S = 0.25
# The model's describe calls (readiness, /metadata) beside the fronts' classify and heatmap calls.
MODEL_HEADROOM = 8
# BentoML's own per-request timeout answers outside the service's middlewares (no request
# ID); set this much later than the front's own deadline, it is only a backstop.
BACKSTOP_S = 5


class RouteLimitMiddleware:
    """ASGI middleware: at most `limits[class]` requests of a route class at once in this
    process; beyond it, 503 in the error shape with Retry-After, without waiting."""

    def __init__(self, app: Any, limits: dict[str, int]) -> None:
        self.app, self.limits = app, dict(limits)
        self.running = dict.fromkeys(self.limits, 0)  # one event loop per process: no lock

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = ROUTE_CLASSES.get((scope.get("method"), scope.get("path")))
        if kind is None or scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.running[kind] >= self.limits[kind]:
            return await self._shed(kind)(scope, receive, send)
        self.running[kind] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.running[kind] -= 1

    def _shed(self, kind: str) -> Any:
        message = (
            f"the server is at capacity for {kind} requests "
            f"(at most {self.limits[kind]} at once per front process); try again"
        )
        return error_response(503, message, headers={"Retry-After": str(RETRY_AFTER_S)})


class DeadlineMiddleware:
    """ASGI middleware: a request not answering within `timeout_s` gets 504 in the error
    shape (then the work it started is cancelled; a thread already running finishes)."""

    def __init__(self, app: Any, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        answering, late = asyncio.Event(), False

        async def watched_send(message: dict) -> None:
            if not late:
                answering.set()
                await send(message)

        work = asyncio.ensure_future(self.app(scope, receive, watched_send))
        started = asyncio.ensure_future(answering.wait())
        done, _ = await asyncio.wait(
            {work, started}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        started.cancel()
        if not done:
            late = True
            work.cancel()
            message = f"no answer within {self.timeout_s:g} s; try again later"
            return await error_response(504, message)(scope, receive, send)
        await work


def front_limits(settings: ServiceSettings) -> dict[str, int]:
    """The per-class limits of one front process."""
    return {"predict": settings.max_concurrent_requests, "explain": settings.max_concurrent_explains}


def model_max_concurrency(settings: ServiceSettings) -> int:
    """BentoML's `max_concurrency` for the model service: everything the fronts may send at
    once, per model worker (BentoML divides it among them), plus the describe calls."""
    per_front = settings.max_concurrent_requests + settings.max_concurrent_explains
    return settings.model_workers * (settings.front_workers * per_front + MODEL_HEADROOM)


def heatmap_pause(took_s: float, predicting: bool, share: float = HEATMAP_SHARE) -> float:
    """Seconds the heatmap lane stays closed after a heatmap that took `took_s`: none when
    no prediction is running, else enough that heatmaps use at most `share` of the time."""
    if not predicting or share >= 1:
        return 0.0
    return took_s * (1 - share) / share


class HeatmapLane:
    """Heatmaps one at a time on a thread of their own; at most `max_waiting` wait for it
    (without holding a thread); beyond, ServiceUnavailable (the front answers 503).

    `predicting()` says whether predictions are running: then each heatmap is followed by
    the pause `heatmap_pause` gives, so /explain cannot take the cores /predict needs."""

    def __init__(
        self,
        max_waiting: int,
        predicting: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.max_waiting = max_waiting
        self._predicting, self._clock, self._sleep = predicting, clock, sleep
        self._pending = 0  # running and waiting; one event loop per process: no lock
        self._limiter: Any = None  # made in the server's event loop, on first use
        self._open_at = float("-inf")  # when the next heatmap may start

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """`func(*args)` on the heatmap thread, after the heatmaps before it."""
        import anyio
        from bentoml.exceptions import ServiceUnavailable

        if self._pending > self.max_waiting:
            raise ServiceUnavailable(f"{self._pending} heatmaps are already queued; try again")
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        self._pending += 1
        try:
            async with self._limiter:
                closed_for = self._open_at - self._clock()
                if closed_for > 0 and self._predicting():
                    await self._sleep(closed_for)
                started = self._clock()
                try:
                    return await anyio.to_thread.run_sync(functools.partial(func, *args))
                finally:
                    took = self._clock() - started
                    self._open_at = self._clock() + heatmap_pause(took, self._predicting())
        finally:
            self._pending -= 1


def heatmap_waiting_limit(settings: ServiceSettings) -> int:
    """Heatmaps one model worker lets wait: all the fronts may send, so only a client that
    bypasses the fronts' limits is refused here."""
    return settings.front_workers * settings.max_concurrent_explains
