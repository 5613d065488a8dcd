"""Start, wait for and stop a server process: the one helper of the tests, the demo and
the benchmarks.

A server runs in a session (and process group) of its own, so stopping it reaches the
children it started: SIGTERM to the group, a wait, then SIGKILL to the group.

    with ServerProcess(cmd, ready_url=f"http://127.0.0.1:{port}/readyz", log=log, port=port) as srv:
        httpx.get(srv.url ...)

or, for a process that is not waited on (a CLI run), `start`, then `stop`.

BentoML starts each worker in a session of its own (issue 9), so the group alone does not
reach them: `stop` collects the whole tree (psutil, recursively) before the first signal,
SIGKILLs whatever of it outlives the leader, and with `port=` also whatever still
listens there; it returns (and logs) the listeners it could not end.

`run_in_foreground` is the other side, for a command that starts a server and stays its
parent (`imgcls serve`, `imgcls ui`): SIGTERM, SIGINT and SIGHUP are forwarded to the
server, and a tree that is still there `grace_s` after the first one is killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from imgcls.lifeline import set_parent_death_signal

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# Quiet, offline children: no telemetry from MLflow or BentoML, no TensorFlow banner.
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "DO_NOT_TRACK": "true",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
# How much of a log a failure message quotes: enough for a Python traceback.
LOG_TAIL_CHARS = 4000


# `IMGCLS_PORT_SLOT=k/n` (each of the test suite's n pytest-xdist workers sets its own):
# free_port hands out only ports p with p % n == k, so n processes (and their children)
# picking ports at once never pick the same one. They come from below Linux's ephemeral
# range (32768-60999), which the OS's own picks and outgoing connections use.
PORT_SLOT_ENV = "IMGCLS_PORT_SLOT"
SLOT_PORTS = range(20_000, 32_768)
SLOT_TRIES = 200


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now: the OS picks it, or, with
    `IMGCLS_PORT_SLOT=k/n` set, one of this process's slot (see above)."""
    slot = os.environ.get(PORT_SLOT_ENV, "")
    if slot:
        return _free_port_in_slot(host, *(int(part) for part in slot.split("/")))
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _free_port_in_slot(host: str, index: int, count: int) -> int:
    """A random port p of SLOT_PORTS with p % count == index that `host` can bind now."""
    ports = range(SLOT_PORTS.start + (index - SLOT_PORTS.start) % count, SLOT_PORTS.stop, count)
    for port in random.sample(ports, min(SLOT_TRIES, len(ports))):
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind((host, port))
            return port
    raise OSError(f"no free port among {len(ports)} of slot {index}/{count}")


def port_in_use(port: int, host: str = HOST) -> bool:
    """True if something accepts connections on `host:port`."""
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def start(
    cmd: Sequence[str],
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
) -> subprocess.Popen:
    """Start `cmd` in a new session (its own process group).

    stdout and stderr go to `log_path` (overwritten), or to this process's own output
    when it is None. `env` is the child's whole environment (default: this one's).
    """
    if log_path is None:
        return subprocess.Popen(list(cmd), env=env, cwd=cwd, start_new_session=True)
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            list(cmd), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def log_tail(log_path: Path | None, chars: int = LOG_TAIL_CHARS) -> str:
    """The end of a log file, or a note saying there is none."""
    if log_path is None:
        return "(output not captured)"
    try:
        return log_path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(log unreadable: {exc})"


def wait_ready(
    url: str, proc: subprocess.Popen, log_path: Path | None = None, timeout_s: float = 180
) -> None:
    """Poll `url` until it answers 200.

    Raises RuntimeError at once if `proc` exits first, TimeoutError after `timeout_s`;
    both quote the tail of `log_path`. Loopback needs no proxy: `trust_env=False`.
    """
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited ({proc.returncode}) before {url} answered:\n{log_tail(log_path)}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s:\n{log_tail(log_path)}")


def stop(
    proc: subprocess.Popen,
    port: int | None = None,
    term_timeout_s: float = 20,
    kill_timeout_s: float = 10,
    first_signal: int = signal.SIGTERM,
) -> list[int]:
    """Stop `proc`, its process group and every descendant; returns the pids still
    listening on `port` (an empty list: the port is free).

    The descendants are collected before any signal (once the leader is gone, its
    children are re-parented and can no longer be found from it). `first_signal`
    (SIGTERM; PostgreSQL wants SIGINT for its fast shutdown) goes to the group, then up to
    `term_timeout_s` for the leader to exit, then SIGKILL to the group and to every
    collected descendant still alive (BentoML workers live in sessions of their own).
    With `port`, whatever still listens there is killed too, and what survives is logged.
    """
    tree = descendants(proc.pid)
    _signal_group(proc, first_signal)
    try:
        proc.wait(timeout=term_timeout_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=kill_timeout_s)
    _signal_group(proc, signal.SIGKILL)  # members that outlived the leader
    kill_all(tree + descendants(proc.pid), wait_s=kill_timeout_s)
    if port is None:
        return []
    kill_all([_process(pid) for pid in listeners(port) if pid != os.getpid()], wait_s=kill_timeout_s)
    return _report_listeners(port)


def descendants(pid: int) -> list:
    """psutil.Process objects of every live descendant of `pid` (empty if it is gone)."""
    import psutil

    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def tree_alive(processes: Sequence) -> list:
    """Those of `processes` (psutil.Process) still running and not zombies."""
    import psutil

    alive = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


def kill_all(processes: Sequence, wait_s: float = 10) -> list:
    """SIGKILL each live psutil.Process of `processes` (its identity checked by psutil, so
    a recycled pid is spared) and wait up to `wait_s`; returns those still alive."""
    import psutil

    targets = tree_alive([p for p in processes if p is not None])
    for process in targets:
        with contextlib.suppress(psutil.Error):
            process.kill()
    deadline = time.monotonic() + wait_s
    while (alive := tree_alive(targets)) and time.monotonic() < deadline:
        time.sleep(0.05)  # a zombie counts as gone: its parent may be slow to reap it
    return alive


def _process(pid: int):
    import psutil

    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid)
    return None


# Signals a foreground command passes on to its server: service managers (SIGTERM), a
# terminal's Ctrl-C (SIGINT) and a closed terminal (SIGHUP).
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_in_foreground(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    grace_s: float = 30,
    to_group: bool = False,
    poll_s: float = 1.0,
) -> int:
    """Run a server as this process's child until it exits; returns its exit code.

    The child gets a session of its own, so a terminal's Ctrl-C reaches it once, through
    here, and (on Linux) a SIGTERM from the kernel if this command dies, SIGKILL included.
    SIGTERM, SIGINT and SIGHUP received here are forwarded to it (`to_group`: to its whole
    process group, for a server such as `mlflow server` whose own children do not hear
    from it). `grace_s` after the first forwarded signal, or as soon as the child
    exits, whatever is left of its tree (collected on every poll, so workers re-parented
    after a crash of the child are still known) gets SIGKILL. An exit by a signal returns
    128 + its number, as a shell would.
    """
    parent = os.getpid()
    proc = subprocess.Popen(
        list(cmd), env=env, start_new_session=True, preexec_fn=lambda: _term_with_parent(parent)
    )
    received: list[float] = []

    def forward(signum, _frame) -> None:
        received.append(time.monotonic())
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if to_group:
                os.killpg(proc.pid, signum)
            else:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    tree: list = []
    try:
        while proc.poll() is None:
            tree = _merge(tree, descendants(proc.pid))
            if received and time.monotonic() - received[0] > grace_s:
                log.warning("the server outlived its %.0f s graceful timeout: killing it", grace_s)
                kill_all([_process(proc.pid), *tree])
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # an exception here: do not leave the server behind
            kill_all([_process(proc.pid)])
        kill_all(tree)
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


def _term_with_parent(parent: int) -> None:
    """In the forked child, before exec: SIGTERM when this command dies, even by SIGKILL
    (PR_SET_PDEATHSIG survives exec; the forking thread is this command's main thread,
    which lives as long as it). Exits at once if the command is already gone."""
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


def _merge(known: list, found: list) -> list:
    """`known` plus the processes of `found` not in it (psutil.Process compares by pid and
    start time)."""
    return known + [p for p in found if p not in known]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """`sig` to the process group led by `proc` (started with `start_new_session`)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def listeners(port: int) -> list[int]:
    """Pids of processes listening on TCP `port` (those this user may inspect)."""
    import psutil

    pids = set()
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                pids.add(conn.pid)
    return sorted(pids)


def _report_listeners(port: int, grace_s: float = 3) -> list[int]:
    """Wait up to `grace_s` for `port` to close; log and return what still listens."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not port_in_use(port) and not listeners(port):
            return []
        time.sleep(0.2)
    pids = listeners(port)
    log.warning("port %d is still listened on after the stop, by pids %s", port, pids or "(not visible)")
    return pids


class ServerProcess:
    """A server for the length of a `with` block: started, waited for, stopped.

    `ready_url` must answer 200 once the server is up; `port` (if given) is checked
    after the stop, and the leftover listeners end up in `leftovers`. `url` is
    `http://host:port` when `port` is given.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        ready_url: str,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        port: int | None = None,
        host: str = HOST,
        timeout_s: float = 180,
    ) -> None:
        self.cmd, self.ready_url, self.log_path = list(cmd), ready_url, log_path
        self.env, self.cwd, self.port, self.timeout_s = env, cwd, port, timeout_s
        self.url = f"http://{host}:{port}" if port is not None else None
        self.proc: subprocess.Popen | None = None
        self.leftovers: list[int] = []

    @property
    def pid(self) -> int:
        """The server's pid (also its process group and session id)."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> ServerProcess:
        """Start the server and wait until it is ready; stops it if it never is."""
        return self.launch().wait_ready()

    def launch(self) -> ServerProcess:
        """Start the server without waiting for it (`wait_ready` next): several can start at once."""
        self.proc = start(self.cmd, self.log_path, self.env, self.cwd)
        return self

    def wait_ready(self) -> ServerProcess:
        """Wait until the launched server is ready; stops it if it never is."""
        try:
            wait_ready(self.ready_url, self.proc, self.log_path, self.timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> list[int]:
        """Stop the server's process group; returns (and keeps) leftover listeners."""
        if self.proc is not None:
            self.leftovers = stop(self.proc, self.port)
        return self.leftovers

    def log_tail(self) -> str:
        """The end of the server's log."""
        return log_tail(self.log_path)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
