"""A bounded-wait batcher for the model process: batch what queued while the model was busy.

BentoML 1.4's `CorkDispatcher` holds a request while its estimate of the batch's latency
stays under the running average of past queueing delays; after a burst that average is
hundreds of milliseconds, so a lone request then waits for companions that never come
(bentoml#3664 froze changes to it). This policy learns nothing: when the model is idle,
whatever has queued is dispatched at once (up to `max_batch_size` images), and a request
waits for companions at most `max_wait_s` (0 by default: never), as TF Serving's
`batch_timeout_micros` and Triton's `max_queue_delay_microseconds` do. Requests that queued
longer than `deadline_s` are refused (503) instead of computed late.

`decide` is the whole policy, a pure function; `Batcher` runs it on the event loop and runs
each batch on one worker thread, so the loop keeps taking requests meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    """How big a batch may get, how long a request may wait for companions and in all."""

    max_batch_size: int = 32
    max_wait_s: float = 0.0
    deadline_s: float = 10.0


class Overloaded(RuntimeError):
    """A request waited in the queue longer than the deadline: refused, not computed late."""


def decide(queued_images: int, oldest_wait_s: float, busy: bool, policy: Policy) -> float:
    """Seconds to wait before dispatching; 0 means dispatch now.

    Busy or empty: wait until something changes (`inf`). Idle: dispatch at once when the
    batch is full or the oldest request has waited `max_wait_s`, else wait for the rest of
    it. Nothing here depends on what happened before: a lone request after a burst goes at
    once.
    """
    if busy or queued_images == 0:
        return float("inf")
    if queued_images >= policy.max_batch_size or oldest_wait_s >= policy.max_wait_s:
        return 0.0
    return policy.max_wait_s - oldest_wait_s


@dataclass
class _Job:
    items: list
    enqueued: float
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Coalesces concurrent `submit` calls into batches for `run(items) -> results`.

    A call's items stay together in one batch (one model, one version), and the results
    come back in the order of its items. `on_batch(size, oldest_wait_s)` is told of each
    batch and `on_queue(images)` of each change of the images waiting (metrics).
    """

    def __init__(
        self,
        run: Callable[[list], list],
        policy: Policy,
        on_batch: Callable[[int, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_queue: Callable[[int], None] | None = None,
    ):
        self._run, self.policy, self._on_batch, self._clock = run, policy, on_batch, clock
        self._on_queue = on_queue
        self._queue: deque[_Job] = deque()
        self._queued_images = 0
        self._busy = False
        self._last_batch_end = float("-inf")
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="imgcls-batch")

    async def submit(self, items: list) -> list:
        """The results of `items`, computed in a batch with whatever else is queued."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._changed = asyncio.Event()
            self._task = loop.create_task(self._dispatch_forever())
        job = _Job(list(items), self._clock(), loop.create_future())
        self._queue.append(job)
        self._queued_images += len(job.items)
        self._queue_changed()
        self._changed.set()
        return await job.future

    async def _dispatch_forever(self) -> None:
        while True:
            wait = self._next_wait()
            if wait > 0:
                self._changed.clear()
                timeout = None if wait == float("inf") else wait
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout)
                continue
            await self._dispatch(self._take())

    def _next_wait(self) -> float:
        oldest = self._clock() - self._queue[0].enqueued if self._queue else 0.0
        return decide(self._queued_images, oldest, self._busy, self.policy)

    def _take(self) -> list[_Job]:
        """Whole jobs, oldest first, up to max_batch_size images (a bigger job goes alone);
        jobs past the deadline are refused on the way."""
        now, jobs, size = self._clock(), [], 0
        while self._queue:
            job = self._queue[0]
            if now - job.enqueued > self.policy.deadline_s:
                self._pop()
                _fail(job, Overloaded(f"queued {now - job.enqueued:.1f} s, over the deadline"))
                continue
            if jobs and size + len(job.items) > self.policy.max_batch_size:
                break
            jobs.append(self._pop())
            size += len(job.items)
        return jobs

    def _pop(self) -> _Job:
        job = self._queue.popleft()
        self._queued_images -= len(job.items)
        self._queue_changed()
        return job

    def _queue_changed(self) -> None:
        if self._on_queue is not None:
            self._on_queue(self._queued_images)

    async def _dispatch(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        items = [item for job in jobs for item in job.items]
        if self._on_batch is not None:
            self._on_batch(len(items), self._clock() - jobs[0].enqueued)
        self._busy = True
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._thread, self._run, items)
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
            for job in jobs:
                _fail(job, exc)
            return
        finally:
            self._busy = False
            self._last_batch_end = self._clock()
        start = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(results[start : start + len(job.items)])
            start += len(job.items)

    def active_within(self, seconds: float) -> bool:
        """Whether a batch is running or queued, or ended less than `seconds` ago: the
        heatmap lane (service/shedding.py) gives way to predictions while this holds."""
        return self._busy or bool(self._queue) or self._clock() - self._last_batch_end <= seconds

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)


def _fail(job: _Job, exc: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(exc)


def describe(policy: Policy) -> dict[str, Any]:
    """The policy as /metadata shows it."""
    return {"max_batch_size": policy.max_batch_size, "max_wait_ms": policy.max_wait_s * 1000,
            "deadline_ms": policy.deadline_s * 1000}  # fmt: skip
