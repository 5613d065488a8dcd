"""Stopping servers against real processes: `imgcls serve` and `imgcls ui` on SIGTERM, and
BentoML's workers after a SIGKILL of their arbiter or of its process group (issue 9).

Each case asserts on what an operator sees: the held request's answer, the port, and
that no process of the server's tree is left.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from imgcls.processes import (
    QUIET_ENV,
    descendants,
    free_port,
    kill_all,
    listeners,
    port_in_use,
    start,
    tree_alive,
    wait_ready,
)
from service.cli import serve_command
from tests.service_fixtures import colour_image, copy_store, encode, service_env

# timing: every test bounds how long a stop takes (seconds, on a busy machine too).
pytestmark = [pytest.mark.slow, pytest.mark.timing]
ROOT = Path(__file__).resolve().parents[1]
GRACEFUL_S = 10  # the serve tests' --graceful-timeout


@pytest.fixture(scope="module")
def bento_home(tmp_path_factory, tiny_store) -> Path:
    """A BentoML store holding the tiny model as registry version 7."""
    return copy_store(tiny_store, tmp_path_factory.mktemp("bentoml_home"))


def _serve_env(bento_home: Path, hold: Path) -> dict[str, str]:
    env = service_env(bento_home, poll_interval_s=0, front_workers=2)
    env["IMGCLS_HOOK_MODEL_CALL"] = f"hold:{hold}"
    return env


def _tree(pid: int, want: int, timeout_s: float = 30) -> list:
    """The server's process tree (leader first) once it has at least `want` descendants."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = descendants(pid)
        if len(found) >= want:
            return [psutil.Process(pid), *found]
        time.sleep(0.2)
    raise AssertionError(f"pid {pid} has {len(descendants(pid))} descendants, expected {want}")


def _assert_all_gone(tree: list, port: int, within_s: float) -> float:
    """Wait until no process of `tree` runs and nothing listens on `port`; the seconds it took.

    Whatever is left is killed before the assertion fails, so one failure leaks nothing."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        if not tree_alive(tree) and not port_in_use(port) and not listeners(port):
            return time.monotonic() - started
        time.sleep(0.1)
    left = [(p.pid, " ".join(p.cmdline()[:6])) for p in tree_alive(tree)]
    on_port = listeners(port)
    kill_all(tree_alive(tree))
    raise AssertionError(f"after {within_s} s: processes left {left}, port {port} listened on by {on_port}")


def _predict(url: str, out: dict) -> None:
    try:
        out["response"] = httpx.post(
            f"{url}/predict", files={"image": ("red.png", encode(colour_image("red"), "PNG"))}, timeout=60
        )
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)


def test_sigterm_to_imgcls_serve_finishes_the_held_request_and_frees_the_port(bento_home, tmp_path):
    """systemd's KillMode=process: SIGTERM to the CLI's pid alone, while a request is held
    in the model; the request still gets its 200, then the whole tree exits and the port
    is free within the graceful timeout."""
    port, hold = free_port(), tmp_path / "hold"
    cmd = [sys.executable, "-m", "imgcls.cli", "serve", "--port", str(port),
           "--graceful-timeout", str(GRACEFUL_S)]  # fmt: skip
    log = tmp_path / "serve.log"
    cli = start(cmd, log, env=_serve_env(bento_home, hold), cwd=ROOT)
    tree = []
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", cli, log, timeout_s=150)
        tree = _tree(cli.pid, want=4)  # bentoml serve (arbiter), two fronts, one model
        hold.touch()
        out: dict = {}
        request = threading.Thread(target=_predict, args=(f"http://127.0.0.1:{port}", out))
        request.start()
        time.sleep(2)  # the request reaches the model and waits on the hold file
        assert request.is_alive(), out
        os.kill(cli.pid, signal.SIGTERM)
        time.sleep(2)
        assert request.is_alive(), "the held request was cut short by SIGTERM"
        hold.unlink()
        request.join(timeout=30)
        assert "error" not in out, out.get("error")
        assert out["response"].status_code == 200, out["response"].text
        assert out["response"].json()["predictions"][0]["label"] == "red"
        _assert_all_gone(tree, port, within_s=GRACEFUL_S)
        assert cli.wait(timeout=5) in (0, 128 + signal.SIGTERM), (cli.returncode, log.read_text()[-2000:])
    finally:
        hold.unlink(missing_ok=True)
        kill_all(tree + _tree_or_empty(cli.pid))


@pytest.mark.parametrize("target", ["arbiter", "group"])
def test_sigkill_of_bentoml_leaves_no_worker_serving(bento_home, tmp_path, target):
    """`kill -9` of `bentoml serve` (the arbiter) alone, or of its whole process group:
    each worker sits in a session of its own, yet all exit within seconds and free the port."""
    port = free_port()
    log = tmp_path / "bentoml.log"
    arbiter = start(
        serve_command("127.0.0.1", port), log, env=_serve_env(bento_home, tmp_path / "h"), cwd=ROOT
    )
    tree = []
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", arbiter, log, timeout_s=150)
        tree = _tree(arbiter.pid, want=3)
        assert len({os.getsid(p.pid) for p in tree}) == len(tree)  # one session each (circus)
        if target == "arbiter":
            os.kill(arbiter.pid, signal.SIGKILL)
        else:
            os.killpg(arbiter.pid, signal.SIGKILL)
        arbiter.wait(timeout=10)
        took = _assert_all_gone(tree, port, within_s=10)
        assert took < 10
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=2)
    finally:
        kill_all(tree_alive(tree))
        if arbiter.poll() is None:
            arbiter.kill()


def test_sigkill_of_imgcls_serve_stops_its_server(bento_home, tmp_path):
    """`kill -9` of the `imgcls serve` command alone (its server sits in a session of its
    own): the kernel's parent-death SIGTERM stops the arbiter, which stops its workers."""
    port = free_port()
    cmd = [sys.executable, "-m", "imgcls.cli", "serve", "--port", str(port),
           "--graceful-timeout", str(GRACEFUL_S)]  # fmt: skip
    log = tmp_path / "serve.log"
    cli = start(cmd, log, env=_serve_env(bento_home, tmp_path / "h"), cwd=ROOT)
    tree = []
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", cli, log, timeout_s=150)
        tree = _tree(cli.pid, want=4)
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(timeout=10)
        _assert_all_gone(tree, port, within_s=GRACEFUL_S)
    finally:
        kill_all(tree_alive(tree))


def test_sigterm_to_imgcls_ui_stops_mlflow_and_its_uvicorn(tmp_path):
    """`imgcls ui` starts `mlflow server`, which starts uvicorn; SIGTERM to the CLI alone
    leaves none of them and frees the port."""
    port = free_port()
    env = {**os.environ, **QUIET_ENV, "IMGCLS_HOME": str(tmp_path / "home")}
    log = tmp_path / "ui.log"
    cli = start([sys.executable, "-m", "imgcls.cli", "ui", "--port", str(port)], log, env=env, cwd=ROOT)
    tree = []
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", cli, log, timeout_s=120)
        tree = _tree(cli.pid, want=2)  # mlflow server, uvicorn
        os.kill(cli.pid, signal.SIGTERM)
        _assert_all_gone(tree, port, within_s=15)
        assert cli.wait(timeout=5) == 0, log.read_text()[-2000:]
    finally:
        kill_all(tree_alive(tree))


def _tree_or_empty(pid: int) -> list:
    import psutil

    try:
        return [psutil.Process(pid), *descendants(pid)]
    except psutil.Error:
        return []


def test_sigterm_to_imgcls_demo_stops_its_service_and_every_worker(tmp_path):
    """`imgcls demo --keep-serving` (six epochs, enough to pass the gate): SIGTERM to the demo alone, as to
    Ctrl-C, stops the service it started, workers in their own sessions included."""
    port = free_port()
    env = {**os.environ, **QUIET_ENV, "IMGCLS_HOME": str(tmp_path / "home"),
           "BENTOML_HOME": str(tmp_path / "home" / "bentoml")}  # fmt: skip
    log = tmp_path / "demo.log"
    cmd = [sys.executable, "-m", "imgcls.cli", "demo", "--epochs", "6", "--keep-serving", "--port", str(port)]
    demo = start(cmd, log, env=env, cwd=ROOT)
    tree = []
    try:
        deadline = time.monotonic() + 400
        while "Ctrl-C to stop" not in log.read_text() and time.monotonic() < deadline:
            assert demo.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        tree = _tree(demo.pid, want=3)  # bentoml serve, one front, one model
        transcript = log.read_text()  # the demo's own terminal: none of the noise a user cannot act on
        assert not [x for x in ("Downloading artifacts", "oneDNN", "absl::") if x in transcript], transcript
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
        os.kill(demo.pid, signal.SIGTERM)
        _assert_all_gone(tree, port, within_s=30)
        assert demo.wait(timeout=10) == 0, log.read_text()[-2000:]
    finally:
        kill_all(tree_alive(tree + _tree_or_empty(demo.pid)))
