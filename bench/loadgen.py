"""Load generator: senders, a fixed-concurrency driver that records every request, levels
and percentiles. Shared by the benchmarks; nothing here knows which benchmark runs it.

A *sender* is `send(i) -> Answer`: it makes request number `i` and says what came back
(HTTP status, the `version` field of a JSON body, an error text when the request failed).
It raises only for failures below HTTP (connection refused, timeout); `drive` records
those as failed too, with status None.

    stop = threading.Event()
    with http_client(8, timeout_s=30) as client:
        send = service_sender(client, url, jpegs)
        records = drive(send, concurrency=8, duration_s=60, stop=stop)   # every request
        row = run_level(send, requests=256, concurrency=8, cap_s=60, stop=stop)  # a summary

Times are `time.perf_counter()` seconds, so records from several threads (and a swap
started by the benchmark in between) are on one clock.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    """What one request got back: HTTP status, the answering model version, an error."""

    status: int | None
    version: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Record:
    """One request as the client saw it: `start` and `end` are perf_counter seconds."""

    index: int
    start: float
    end: float
    status: int | None
    version: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency_ms(self) -> float:
        return (self.end - self.start) * 1000


Sender = Callable[[int], Answer]


def drive(
    send: Sender,
    concurrency: int,
    *,
    requests: int | None = None,
    duration_s: float | None = None,
    stop: threading.Event | None = None,
) -> list[Record]:
    """Call `send(0)`, `send(1)`, ... from `concurrency` threads; a record for each call.

    Each thread sends its next request as soon as its last one is answered (a closed
    loop at fixed concurrency). Stops after `requests` calls, after `duration_s` seconds
    (no new request starts later; those in flight finish), or once `stop` is set,
    whichever comes first; give at least one of them. Records are in start order.
    """
    if requests is None and duration_s is None and stop is None:
        raise ValueError("drive needs requests, duration_s or stop, or it never ends")
    counter, lock = itertools.count(), threading.Lock()
    deadline = time.perf_counter() + duration_s if duration_s is not None else float("inf")
    records: list[Record] = []

    def worker() -> None:
        while time.perf_counter() < deadline and not (stop and stop.is_set()):
            with lock:
                i = next(counter)
            if requests is not None and i >= requests:
                return
            records.append(_timed(send, i))

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return sorted(records, key=lambda r: r.start)


def open_loop(
    send: Sender,
    rate_per_s: float,
    *,
    duration_s: float,
    stop: threading.Event | None = None,
    max_in_flight: int = 64,
) -> list[Record]:
    """Start `send(i)` at `t0 + i / rate_per_s` for `duration_s` seconds (an open loop:
    arrivals never wait for answers, as real clients do not), from up to `max_in_flight`
    threads; a record for each call, in start order.

    A record's `start` is the request's *scheduled* time, so a request that had to wait
    for a free thread counts that wait in its latency (no coordinated omission).
    """
    records: list[Record] = []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_in_flight) as pool:
        for i in itertools.count():
            due = t0 + i / rate_per_s
            if due - t0 >= duration_s or (stop and stop.is_set()):
                break
            delay = due - time.perf_counter()
            if delay > 0 and stop is not None and stop.wait(delay):
                break
            if delay > 0 and stop is None:
                time.sleep(delay)
            pool.submit(lambda i=i, due=due: records.append(_timed(send, i, due)))
    return sorted(records, key=lambda r: r.start)


def _timed(send: Sender, i: int, start: float | None = None) -> Record:
    """One call of `send`, timed from `start` (default: now); an exception becomes a
    failed record (status None)."""
    start = time.perf_counter() if start is None else start
    try:
        answer = send(i)
    except Exception as exc:  # noqa: BLE001 - recorded and reported, the load goes on
        answer = Answer(None, error=f"{type(exc).__name__}: {exc}"[:200])
    return Record(i, start, time.perf_counter(), answer.status, answer.version, answer.error)


def percentiles(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    """p50, p95 and p99 of latencies in ms (None each when there are none)."""
    import numpy as np

    if not len(latencies_ms):
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(latencies_ms, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def summarize(records: Iterable[Record], seconds: float) -> dict:
    """Answered and failed counts, images/s over `seconds` and latency percentiles of
    the answered requests (failed ones are counted, not timed)."""
    records = list(records)
    ok = [r.latency_ms for r in records if r.ok]
    failed = sorted((r for r in records if not r.ok), key=lambda r: r.end)
    return {
        "requests": len(ok),
        "errors": len(failed),
        "first_error": failed[0].error if failed else None,
        "seconds": seconds,
        "images_per_s": len(ok) / seconds if seconds else 0.0,
        **percentiles(ok),
    }


def between(records: Iterable[Record], start: float, end: float) -> list[Record]:
    """The records of requests that started in [start, end) (perf_counter seconds)."""
    return [r for r in records if start <= r.start < end]


def first_answer(records: Iterable[Record], version: str) -> Record | None:
    """The earliest-ending successful request answered by `version`."""
    return min((r for r in records if r.ok and r.version == version), key=lambda r: r.end, default=None)


def last_answer(records: Iterable[Record], version: str) -> Record | None:
    """The latest-ending successful request answered by `version`."""
    return max((r for r in records if r.ok and r.version == version), key=lambda r: r.end, default=None)


def run_level(
    send: Sender, requests: int, concurrency: int, cap_s: float, stop: threading.Event | None = None
) -> dict:
    """`requests` calls of `send` from `concurrency` threads, stopped at `cap_s` seconds.

    Latency is per call, client side, until the whole answer is read; images/s counts
    answered calls over the level's wall time. `capped` says the cap (or `stop`) cut it short.
    """
    start = time.perf_counter()
    records = drive(send, concurrency, requests=requests, duration_s=cap_s, stop=stop)
    row = {"concurrency": concurrency} | summarize(records, time.perf_counter() - start)
    row["capped"] = len(records) < requests
    return row


def run_levels(
    send: Sender,
    levels: Sequence[int],
    requests: Callable[[int], int],
    cap_s: float,
    warm: int,
    probe: Callable[[], dict] | None = None,
    cpu: Callable[[], dict[str, float]] | None = None,
    server_side: Callable[[dict, dict], dict] | None = None,
    stop: threading.Event | None = None,
) -> list[dict]:
    """A warm-up burst of `warm` calls at the top level (not timed), then each level.

    `requests(concurrency)` is the level's request count. `probe()` snapshots the server
    before and after each level and `server_side(before, after)` turns the two into
    columns of the row (e.g. access-log times). `cpu()` gives CPU seconds per process
    group (bench.sampling.cpu_counter); each row then gets CPU ms per answered image.
    Every row also has the load average at its end.
    """
    run_level(send, warm, max(levels), cap_s, stop)
    results = []
    for concurrency in levels:
        row = measured_level(send, requests(concurrency), concurrency, cap_s, probe, cpu, server_side, stop)
        results.append(row)
        print(f"    c={concurrency}: {row['images_per_s']:.1f} images/s, {row['errors']} errors", flush=True)
    return results


def measured_level(
    send: Sender,
    requests: int,
    concurrency: int,
    cap_s: float,
    probe: Callable[[], dict] | None = None,
    cpu: Callable[[], dict[str, float]] | None = None,
    server_side: Callable[[dict, dict], dict] | None = None,
    stop: threading.Event | None = None,
) -> dict:
    """`run_level`'s row, with the load average at its end, CPU ms per answered image of
    each process group (`cpu`) and server-side columns (`server_side` of two `probe`s)."""
    from bench.sampling import cpu_per_image

    before = probe() if probe else None
    cpu_before = cpu() if cpu else None
    row = run_level(send, requests, concurrency, cap_s, stop) | {"load": os.getloadavg()[0]}
    if cpu:
        row["cpu_ms_per_image"] = cpu_per_image(cpu_before, cpu(), row["requests"])
    if probe and server_side:
        time.sleep(0.5)  # let the server flush its access log
        row |= server_side(before, probe())
    return row


def http_client(concurrency: int, timeout_s: float):
    """One pooled httpx client for every thread; trust_env=False keeps loopback off any
    proxy. Give each request the level's cap as `timeout_s`, so none runs past twice it."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.Client(limits=limits, timeout=timeout_s, trust_env=False)


class LevelClient:
    """An httpx client made anew for each level (`renew`): each level's users bring their
    own connections, as different users would.

    One client kept across levels carries the burst's kept-alive connections into the lone
    level after it, and httpcore checks every one of them on each request: after a c=128
    burst the client's CPU per lone request went from ~1.3 to ~5 ms, in the latency path
    (docs/benchmarks.md, "Serving beside LitServe and Ray Serve", run 6). `post` and
    `get` go to the current client; use it as a context manager."""

    def __init__(self, concurrency: int, timeout_s: float):
        self.timeout_s = timeout_s
        self._client = http_client(concurrency, timeout_s)

    def renew(self, concurrency: int) -> None:
        """Close the connections of the last level; a fresh pool for `concurrency`."""
        old, self._client = self._client, http_client(concurrency, self.timeout_s)
        old.close()

    def post(self, *args, **kwargs):
        return self._client.post(*args, **kwargs)

    def get(self, *args, **kwargs):
        return self._client.get(*args, **kwargs)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> LevelClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def service_sender(client, url: str, jpegs: Sequence[bytes]) -> Sender:
    """POST {url}/predict with the i-th JPEG (cycling) as multipart field `image`.

    Succeeds on a 200 with predictions; the answer's `version` is the model version
    that made them.
    """

    def send(i: int) -> Answer:
        answer = client.post(
            f"{url}/predict", files={"image": (f"{i}.jpg", jpegs[i % len(jpegs)], "image/jpeg")}
        )
        if answer.status_code != 200:
            return Answer(answer.status_code, error=f"HTTP {answer.status_code}: {answer.text[:150]}")
        body = answer.json()
        version = None if body.get("version") is None else str(body["version"])
        if not body.get("predictions"):
            return Answer(200, version, error=f"no predictions: {answer.text[:150]}")
        return Answer(200, version)

    return send


def mlflow_sender(client, url: str, bodies: Sequence[bytes]) -> Sender:
    """POST {url}/invocations with the i-th pre-encoded {"inputs": ...} JSON body."""

    def send(i: int) -> Answer:
        answer = client.post(
            f"{url}/invocations",
            content=bodies[i % len(bodies)],
            headers={"Content-Type": "application/json"},
        )
        if answer.status_code != 200:
            return Answer(answer.status_code, error=f"HTTP {answer.status_code}: {answer.text[:150]}")
        return Answer(200)

    return send
