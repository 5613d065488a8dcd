"""A server worker dies with the process that started it: no worker outlives its arbiter.

BentoML's arbiter (circus) starts every worker in a session of its own (`os.setsid` in
circus' `Process.spawn`), so a signal to the arbiter's process group never reaches them,
and a SIGKILL of the arbiter (the OOM killer, `kill -9`) leaves them serving the old
model on the old port: they still hold the listening socket the arbiter passed them.

`die_with_parent()`, called first thing in each worker, ties the worker to its parent
in two ways:

- **A watchdog thread** polls `os.getppid()`. When the parent dies the worker is
  re-parented (to init or a subreaper) and the pid changes; the worker then sends itself
  SIGTERM (uvicorn closes the socket and finishes what it holds) and, `grace_s` later,
  SIGKILL. It works whatever thread started the worker, on any POSIX system, and also
  catches a parent that died before the worker got here.
- **PR_SET_PDEATHSIG** (Linux, via ctypes; skipped elsewhere) asks the kernel for
  SIGTERM at the parent's death, at once rather than at the next poll. The kernel sends
  it when the parent *thread* that forked the worker exits, not the parent process:
  circus forks from its event-loop thread, which lives as long as the arbiter, but a
  launcher that forks from a short-lived thread would send it early. That signal is only
  SIGTERM (a graceful stop, never a kill) so an early one cannot cut requests short, and
  the decision to kill rests with the watchdog, which looks at the parent process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

# Seconds between two looks at the parent: a few per second costs nothing.
POLL_S = 0.5
# What a worker gets to finish in-flight work once its parent is gone, before SIGKILL.
GRACE_S = 5.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h

_started: set[int] = set()  # pids that run a watchdog already (a fork gets its own)


def die_with_parent(grace_s: float = GRACE_S, poll_s: float = POLL_S) -> int:
    """Make this process exit within about `grace_s + poll_s` of its parent's death.

    Returns the parent's pid. Idempotent per process; safe to call anywhere (a no-op
    guard for PDEATHSIG off Linux).
    """
    parent = os.getppid()
    if os.getpid() in _started:
        return parent
    _started.add(os.getpid())
    set_parent_death_signal(signal.SIGTERM)
    threading.Thread(
        target=_watch, args=(parent, grace_s, poll_s), name="imgcls-lifeline", daemon=True
    ).start()
    return parent


def set_parent_death_signal(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) on Linux; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    return False


def _watch(parent: int, grace_s: float, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    log.warning("parent process %d is gone: stopping this worker (pid %d)", parent, os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os.kill(os.getpid(), signal.SIGKILL)
