"""imgcls.processes with real processes: an HTTP server, one that dies, one that ignores SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from imgcls.processes import (
    SLOT_PORTS,
    ServerProcess,
    descendants,
    free_port,
    listeners,
    port_in_use,
    run_in_foreground,
    start,
    stop,
    wait_ready,
)

pytestmark = pytest.mark.timing  # stops and failures bounded in seconds


def http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


def test_port_slots_never_share_a_port_and_skip_one_in_use(monkeypatch):
    """Two xdist workers (IMGCLS_PORT_SLOT=0/2 and 1/2, tests/conftest.py) pick from
    disjoint ports below the OS's own picks; a port in use is never handed out."""
    picked = {}
    for slot in ("0/2", "1/2"):
        monkeypatch.setenv("IMGCLS_PORT_SLOT", slot)
        picked[slot] = {free_port() for _ in range(100)}
    assert {p % 2 for p in picked["0/2"]} == {0} and {p % 2 for p in picked["1/2"]} == {1}
    assert max(picked["0/2"] | picked["1/2"]) < 32768  # Linux's ephemeral range starts there
    count = len(SLOT_PORTS) // 2  # a slot of exactly two ports
    monkeypatch.setenv("IMGCLS_PORT_SLOT", f"0/{count}")
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        other = free_port()
        assert other != held.getsockname()[1] and {free_port() for _ in range(20)} == {other}


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


def test_stop_kills_a_listener_in_a_session_of_its_own(tmp_path):
    """A server started in a session of its own (as BentoML's workers are) is out of
    reach of the group's signal; stop() found it in the tree beforehand and kills it."""
    port = free_port()
    code = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-m', 'http.server', '{port}', '--bind', '127.0.0.1'], "
        "start_new_session=True); time.sleep(120)"
    )
    proc = start([sys.executable, "-c", code], tmp_path / "parent.log")
    wait_ready(f"http://127.0.0.1:{port}/", proc, tmp_path / "parent.log", timeout_s=30)
    (child,) = descendants(proc.pid)
    assert os.getsid(child.pid) != os.getsid(proc.pid)
    assert stop(proc, port=port) == []
    assert _gone_within(child.pid, 5)
    assert not port_in_use(port)


def test_stop_kills_what_listens_on_the_port_outside_the_tree(tmp_path):
    """A daemonised server (its parent exited, so it is nobody's descendant any more) that
    holds the port is found by the port and killed."""
    port = free_port()
    server = f"[sys.executable, '-m', 'http.server', '{port}', '--bind', '127.0.0.1']"
    middle = f"import subprocess, sys; subprocess.Popen({server}, start_new_session=True)"
    code = (
        f"import subprocess, sys, time; subprocess.run([sys.executable, '-c', {middle!r}]); time.sleep(120)"
    )
    proc = start([sys.executable, "-c", code], tmp_path / "parent.log")
    wait_ready(f"http://127.0.0.1:{port}/", proc, tmp_path / "parent.log", timeout_s=30)
    (daemon,) = listeners(port)
    assert daemon not in [p.pid for p in descendants(proc.pid)]
    assert stop(proc, port=port) == []
    assert _gone_within(daemon, 5) and not port_in_use(port)


def test_run_in_foreground_forwards_sigterm_and_kills_a_stubborn_tree(tmp_path):
    """The child ignores SIGTERM and has a grandchild in another session: a SIGTERM to
    the foreground command ends both, `grace_s` later, and the exit code says SIGKILL."""
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    server = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"c = subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True); "
        "print(c.pid, flush=True); time.sleep(120)"
    )
    runner = (
        "import sys; from imgcls.processes import run_in_foreground; "
        f"sys.exit(run_in_foreground([sys.executable, '-c', {server!r}], grace_s=1))"
    )
    log = tmp_path / "runner.log"
    proc = start([sys.executable, "-c", runner], log, cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 30
        while not log.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.1)
        grandchild = int(log.read_text().split()[0])
        time.sleep(1.5)  # a poll of the runner (every second) has seen the grandchild
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)  # the runner alone, as systemd's KillMode=process
        assert proc.wait(timeout=15) == 128 + signal.SIGKILL
        assert time.monotonic() - started < 10
        assert _gone_within(grandchild, 5)
    finally:
        stop(proc)


def test_run_in_foreground_returns_the_servers_exit_code():
    code = "import sys; sys.exit(4)"
    assert run_in_foreground([sys.executable, "-c", code]) == 4


def test_a_worker_dies_with_its_parent(tmp_path):
    """die_with_parent(): after a SIGKILL of its parent, the worker (in a session of its
    own, so no group signal reaches it) exits within a few seconds, even one that ignores
    the SIGTERM it gets first (the watchdog's SIGKILL follows)."""
    worker = (
        "import signal, time; from imgcls.lifeline import die_with_parent; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); die_with_parent(grace_s=1); "
        "print('ready', flush=True); time.sleep(120)"
    )
    parent = (
        "import subprocess, sys, time; "
        f"c = subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True); "
        "print(c.pid, flush=True); time.sleep(120)"
    )
    log = tmp_path / "parent.log"
    proc = start([sys.executable, "-c", parent], log, cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 30
        while "ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        worker_pid = int(log.read_text().split()[0])
        os.kill(proc.pid, signal.SIGKILL)
        assert _gone_within(worker_pid, 5)
    finally:
        stop(proc)


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
