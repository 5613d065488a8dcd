"""bench.loadgen's Locust child (bench.locust_load), for real, against a small local HTTP
server: every request recorded once, with its status, the version that answered and
times on the parent's own clock; failures (a 503, a closed port) recorded as failed."""

from __future__ import annotations

import http.server
import importlib.util
import json
import sys
import threading
import time

import pytest

from bench import loadgen
from imgcls.processes import free_port

# Looked up, not imported: importing locust would gevent-patch this process.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None, reason="locust is a peer of the benchmarks: `make peers`"
)


class Handler(http.server.BaseHTTPRequestHandler):
    """/predict: predictions from version 1 for the first 6 requests, then version 2;
    /slow: the same after 0.2 s; /busy: 503."""

    protocol_version = "HTTP/1.1"
    seen = 0
    lock = threading.Lock()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).seen += 1
            version = "1" if type(self).seen <= 6 else "2"
        if self.path == "/slow":
            time.sleep(0.2)
        status, body = (503, b"busy") if self.path == "/busy" else (200, json.dumps(
            {"predictions": [{"label": "cat", "probability": 1.0}], "version": version}).encode())  # fmt: skip
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def url():
    Handler.seen = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_locust_child_records_every_request_on_the_parents_clock(url, tmp_path):
    load = loadgen.predict_load(url, tmp_path, [b"jpeg-a", b"jpeg-b"], timeout_s=10)
    before = time.perf_counter()
    run = loadgen.drive(load, concurrency=2, requests=12)
    after = time.perf_counter()
    records = run.records
    assert sorted(r.index for r in records) == list(range(12))
    assert all(r.ok and r.status == 200 for r in records)
    assert sorted(r.version for r in records) == ["1"] * 6 + ["2"] * 6
    assert all(before < r.start < r.end < after for r in records)
    assert [r.start for r in records] == sorted(r.start for r in records)
    assert 0 < run.ended - run.started < after - before and run.client_cpu_s > 0
    assert "gevent" not in sys.modules and "locust" not in sys.modules  # patched in the child only


def test_failed_requests_are_recorded_as_failed(url, tmp_path):
    (tmp_path / "x").write_bytes(b"x")
    busy = loadgen.Http(url, (loadgen.upload("/busy", "image", "x.jpg", tmp_path / "x", label="busy"),))
    records = loadgen.drive(busy, 1, requests=3).records
    assert [(r.status, r.ok) for r in records] == [(503, False)] * 3
    assert records[0].error.startswith("busy: HTTP 503: busy")
    closed = loadgen.predict_load(f"http://127.0.0.1:{free_port()}", tmp_path, [b"x"], timeout_s=5)
    records = loadgen.drive(closed, 1, requests=2).records
    assert len(records) == 2 and all(r.status is None and "Refused" in r.error for r in records)


@pytest.mark.timing
def test_an_open_loop_keeps_its_rate_when_answers_are_slow(url, tmp_path):
    """At 50 requests/s with each answer taking 0.2 s, 32 users still start ~50 in a
    second (a closed loop of 4 would start 20), each timed from its due time."""
    slow = loadgen.Http(url, (loadgen.upload("/slow", "image", "x.jpg", next(iter(
        loadgen.body_files(tmp_path, [b"x"]))), predictions=True),))  # fmt: skip
    run = loadgen.drive(slow, 32, duration_s=1.0, rate_per_s=50)
    assert len(run.records) == 50  # every slot due in the second, however late its user
    starts = [r.start for r in run.records]
    assert max(b - a for a, b in zip(starts, starts[1:], strict=False)) == pytest.approx(0.02, abs=1e-6)
    assert all(r.ok and r.latency_ms >= 190 for r in run.records)


def test_a_load_without_an_end_streams_its_records_and_stops_on_the_event(url, tmp_path):
    stop = threading.Event()
    load = loadgen.predict_load(url, tmp_path, [b"x"], timeout_s=10)
    with loadgen.Locust(load, 2) as child:
        child.go()
        while len(child.records) < 5:  # they arrive while the load runs
            time.sleep(0.01)
        assert child.wait(timeout_s=0.1) is None  # still running
        threading.Timer(0.2, stop.set).start()
        run = child.wait(stop)
    assert len(run.records) >= 5 and all(r.ok for r in run.records)
