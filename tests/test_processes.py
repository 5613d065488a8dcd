"""imgcls.processes with real processes: an HTTP server, one that dies, one that ignores SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import time

import httpx
import pytest

from imgcls.processes import ServerProcess, free_port, port_in_use, start, stop, wait_ready


def http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


def test_server_process_answers_then_stop_frees_its_port(tmp_path):
    port = free_port()
    assert not port_in_use(port)
    with ServerProcess(
        http_server(port), f"http://127.0.0.1:{port}/", tmp_path / "http.log", port=port
    ) as srv:
        assert httpx.get(f"{srv.url}/", trust_env=False).status_code == 200
        proc = srv.proc
    assert proc.poll() is not None
    assert srv.leftovers == []
    assert not port_in_use(port)


def test_a_process_that_exits_early_fails_the_wait_with_its_log(tmp_path):
    log = tmp_path / "dying.log"
    code = "import sys; print('cannot load the model: no such file', flush=True); sys.exit(3)"
    proc = start([sys.executable, "-c", code], log)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exited \(3\)[\s\S]*cannot load the model: no such file"):
        wait_ready(f"http://127.0.0.1:{free_port()}/", proc, log, timeout_s=60)
    assert time.monotonic() - started < 30  # failed early, not at the timeout
    stop(proc)


def test_a_server_that_never_answers_times_out_with_its_log(tmp_path):
    log = tmp_path / "silent.log"
    proc = start([sys.executable, "-c", "import time; print('starting', flush=True); time.sleep(60)"], log)
    try:
        with pytest.raises(TimeoutError, match="starting"):
            wait_ready(f"http://127.0.0.1:{free_port()}/", proc, log, timeout_s=2)
    finally:
        stop(proc)


def test_a_group_ignoring_sigterm_is_killed(tmp_path):
    """The leader and a child it started both ignore SIGTERM; SIGKILL to the group ends both."""
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    code = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"c = subprocess.Popen([sys.executable, '-c', {child!r}]); print(c.pid, flush=True); time.sleep(120)"
    )
    log = tmp_path / "stubborn.log"
    proc = start([sys.executable, "-c", code], log)
    deadline = time.monotonic() + 30
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    child_pid = int(log.read_text().split()[0])
    started = time.monotonic()
    stop(proc, term_timeout_s=1)
    assert proc.returncode == -9
    assert time.monotonic() - started < 10
    assert _gone_within(child_pid, 5)


def test_stop_reports_a_listener_outside_the_group(tmp_path):
    """A server started in a session of its own (as BentoML's workers are) survives the
    group's stop; `stop(port=)` names it."""
    port = free_port()
    code = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-m', 'http.server', '{port}', '--bind', '127.0.0.1'], "
        "start_new_session=True); time.sleep(120)"
    )
    proc = start([sys.executable, "-c", code], tmp_path / "parent.log")
    orphan = None
    try:
        wait_ready(f"http://127.0.0.1:{port}/", proc, tmp_path / "parent.log", timeout_s=30)
        leftovers = stop(proc, port=port)
        assert len(leftovers) == 1 and leftovers[0] != proc.pid
        orphan = leftovers[0]
        assert port_in_use(port)
    finally:
        stop(proc)
        if orphan:
            os.kill(orphan, signal.SIGKILL)


def _gone_within(pid: int, seconds: float) -> bool:
    """True once `pid` has exited (gone, or a zombie awaiting its reaper) within `seconds`:
    a SIGKILLed process takes a moment to leave."""
    import psutil

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False
