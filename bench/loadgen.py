"""Load generator: HTTP load from Locust in a child process of its own (bench.locust_load),
a small loop for in-process senders, and levels and percentiles over the records.

A load is `Http` (a URL and the cycle of requests the child sends: `predict_load`,
`invocations_load`, or one's own) or an in-process sender `send(i)` (the model itself, timed
in this process; it raises on failure).

    load = predict_load(url, work / "load", jpegs)
    records = drive(load, concurrency=8, duration_s=60, stop=stop).records   # every request
    row = run_level(load, requests=256, concurrency=8, cap_s=60, stop=stop)  # a summary

Each `drive` of an `Http` load is a fresh child, so each level's users bring their own
connections (a c=128 burst's kept-alive ones once slowed the lone level after it: run 6 in
docs/benchmarks.md, in git history: commit 821bf54). Times are `time.perf_counter()`
seconds, in the child as here (CLOCK_MONOTONIC: one clock for the machine), so a swap
made here falls among the records.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.harness import ROOT, percentiles


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


Sender = Callable[[int], object]  # in process: send(i) makes request i; it raises on failure


@dataclass(frozen=True)
class Http:
    """An HTTP load for the Locust child: request `i` is `cycle[i % len(cycle)]` to `url`
    (the entries as bench.locust_load describes them), each answered within `timeout_s`."""

    url: str
    cycle: tuple[dict, ...]
    timeout_s: float = 60.0


@dataclass(frozen=True)
class Run:
    """The records of one load (in start order), when it started and ended (perf_counter
    seconds) and the CPU seconds the Locust child spent on it (0 in process)."""

    records: list[Record]
    started: float
    ended: float
    client_cpu_s: float = 0.0


def body_files(folder: Path, blobs: Sequence[bytes]) -> list[Path]:
    """Each blob as a file in `folder` (named by its content), for the child to read."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{hashlib.sha1(blob).hexdigest()[:16]}.bin" for blob in blobs]
    for path, blob in zip(paths, blobs, strict=True):
        if not path.exists():
            path.write_bytes(blob)
    return paths


def upload(path: str, field: str, name: str, file: Path, kind: str | None = None, **extra) -> dict:
    """A cycle entry: POST `path` with `file` as multipart `field` named `name`."""
    return {"path": path, "files": [[field, name, str(file), kind or "application/octet-stream"]]} | extra


def predict_load(url: str, folder: Path, jpegs: Sequence[bytes], timeout_s: float = 60.0) -> Http:
    """POST {url}/predict with the i-th JPEG (cycling) as multipart field `image`; a 200
    must carry predictions, and records the `version` that made them."""
    files = enumerate(body_files(folder, jpegs))
    cycle = (upload("/predict", "image", f"{n}.jpg", f, "image/jpeg", predictions=True) for n, f in files)
    return Http(url, tuple(cycle), timeout_s)


def invocations_load(url: str, folder: Path, bodies: Sequence[bytes], timeout_s: float = 60.0) -> Http:
    """POST {url}/invocations with the i-th pre-encoded {"inputs": ...} JSON body."""
    cycle = ({"path": "/invocations", "body": str(f), "content_type": "application/json"}
             for f in body_files(folder, bodies))  # fmt: skip
    return Http(url, tuple(cycle), timeout_s)


class Locust:
    """One Locust child (`python -m bench.locust_load`) set up for one load and ready:
    `go()` starts the load, `stop()` ends it early (those in flight finish), `wait()`
    gives its Run; `records` grows as answers arrive. Use it as a context manager: the
    child is killed if it is still running at the end."""

    def __init__(self, load: Http, concurrency: int, *, requests: int | None = None,
                 duration_s: float | None = None, rate_per_s: float | None = None) -> None:  # fmt: skip
        spec = dict(url=load.url, cycle=load.cycle, timeout_s=load.timeout_s, concurrency=concurrency,
                    requests=requests, duration_s=duration_s, rate_per_s=rate_per_s)  # fmt: skip
        self.records: list[Record] = []
        self.summary: dict | None = None
        cmd = [sys.executable, "-m", "bench.locust_load"]
        self._proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        print(json.dumps(spec), file=self._proc.stdin, flush=True)
        if self._proc.stdout.readline().strip() != '{"ready": true}':  # or "" once it has died
            self.__exit__()
            raise RuntimeError(f"bench.locust_load did not start (exit {self._proc.returncode}): make peers?")
        self._reader = threading.Thread(target=self._read, name="locust-records", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            item = json.loads(line)
            if isinstance(item, list):
                self.records.append(Record(*item))
            else:
                self.summary = item

    def go(self) -> Locust:
        print("go", file=self._proc.stdin, flush=True)
        self._proc.stdin.close()
        return self

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)

    def wait(self, stop: threading.Event | None = None, timeout_s: float = float("inf")) -> Run | None:
        """Wait for the load to end (`stop` set: end it now); its Run, or None if it still
        runs after `timeout_s`."""
        deadline = time.perf_counter() + timeout_s
        while self._reader.is_alive():
            if stop is not None and stop.is_set():
                self.stop()
            if time.perf_counter() > deadline:
                return None
            self._reader.join(0.1)
        if self._proc.wait() or self.summary is None:
            raise RuntimeError(f"bench.locust_load failed (exit {self._proc.returncode})")
        if self.summary["cpu_warning"]:
            print("    warning: the Locust child ran above 90% CPU: the load may be its limit", flush=True)
        records, summary = sorted(self.records, key=lambda r: r.start), self.summary
        return Run(records, summary["started"], summary["ended"], summary["cpu_s"])

    def __enter__(self) -> Locust:
        return self

    def __exit__(self, *exc) -> None:
        self._proc.kill()  # a no-op once it has ended
        self._proc.wait()


def drive(
    send: Http | Sender,
    concurrency: int,
    *,
    requests: int | None = None,
    duration_s: float | None = None,
    rate_per_s: float | None = None,
    stop: threading.Event | None = None,
    on_start: Callable[[], None] | None = None,
) -> Run:
    """`concurrency` users sending requests 0, 1, ...; a record for each.

    A closed loop (each user sends its next request once its last is answered), or with
    `rate_per_s` (Http only) an open loop: request `i` is due at `t0 + i / rate` whatever
    the answers do, sent by the first free user, its latency counted from that due time
    (no coordinated omission). Stops after `requests`, after `duration_s` (those in flight
    finish) or once `stop` is set. `on_start()` runs just before the first request, once
    the Locust child is up: its start-up stays out of what `on_start` brackets."""
    if requests is None and duration_s is None and stop is None:
        raise ValueError("drive needs requests, duration_s or stop, or it never ends")
    on_start = on_start or (lambda: None)
    if not isinstance(send, Http):
        on_start()
        return _in_process(send, concurrency, requests, duration_s, stop)
    with Locust(send, concurrency, requests=requests, duration_s=duration_s, rate_per_s=rate_per_s) as child:
        on_start()
        return child.go().wait(stop)


def _in_process(send: Sender, concurrency: int, requests, duration_s, stop) -> Run:
    """The closed loop of `drive` from `concurrency` threads of this process."""
    counter, records, start = itertools.count(), [], time.perf_counter()  # count(): atomic under the GIL
    deadline = start + duration_s if duration_s is not None else float("inf")

    def worker() -> None:
        for i in counter:
            stopped = stop is not None and stop.is_set()
            if stopped or time.perf_counter() >= deadline or (requests is not None and i >= requests):
                return
            t0, error = time.perf_counter(), None
            try:
                send(i)
            except Exception as exc:  # noqa: BLE001 - recorded and reported, the load goes on
                error = f"{type(exc).__name__}: {exc}"[:200]
            records.append(Record(i, t0, time.perf_counter(), None if error else 200, None, error))

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: worker(), range(concurrency)))
    return Run(sorted(records, key=lambda r: r.start), start, time.perf_counter())


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


def run_level(
    send: Http | Sender,
    requests: int,
    concurrency: int,
    cap_s: float,
    stop: threading.Event | None = None,
    probe: Callable[[], dict] | None = None,
    cpu: Callable[[], dict[str, float]] | None = None,
    server_side: Callable[[dict, dict], dict] | None = None,
) -> dict:
    """`requests` requests from `concurrency` users, stopped at `cap_s` seconds: counts,
    images/s, client-side latency percentiles, `capped` (the cap or `stop` cut it short),
    the load average at its end; CPU ms per answered image of each process group (`cpu`:
    bench.sampling.cpu_counter, "client" plus the Locust child's CPU of the load) and
    server-side columns (`server_side` of two `probe`s), first read just before the load."""
    from bench.sampling import cpu_per_image

    before: dict = {}

    def on_start() -> None:
        before["probe"], before["cpu"] = probe() if probe else None, cpu() if cpu else None

    run = drive(send, concurrency, requests=requests, duration_s=cap_s, stop=stop, on_start=on_start)
    row = {"concurrency": concurrency} | summarize(run.records, (run.ended - run.started))
    row |= {"capped": len(run.records) < requests, "load": os.getloadavg()[0]}
    if cpu:
        after = cpu()
        after["client"] = after.get("client", 0.0) + run.client_cpu_s
        row["cpu_ms_per_image"] = cpu_per_image(before["cpu"], after, row["requests"])
    if probe and server_side:
        time.sleep(0.5)  # let the server flush its access log
        row |= server_side(before["probe"], probe())
    return row


def probe_client(timeout_s: float = 30.0):
    """An httpx client for what a benchmark reads besides the load (/metadata, /metrics,
    full probabilities); trust_env=False keeps loopback off any proxy."""
    import httpx

    return httpx.Client(timeout=timeout_s, trust_env=False)
