"""Mutual exclusion for alias moves, suited to the store.

- Local SQLite store: an `fcntl` lock on a file next to the database, released by the
  kernel if the process dies.
- Remote tracking server: MLflow has no compare-and-set, so a lease is written as a
  registered-model tag, left to settle, and read back; the writer whose lease survives
  owns the lock. A heartbeat thread renews it every `lease_s / 3` while it is held, and
  `Held.check()` reads it back right before the alias and its history are written. A
  crashed owner's lease expires after `lease_s`.
Also: Ctrl-C / SIGTERM are held back while the alias and its history are written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import signal
import threading
import time
import uuid
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from imgcls.settings import TrackingSettings
from registry.settings import RegistrySettings

log = logging.getLogger(__name__)

LEASE_TAG = "imgcls.lock"
# Wait before reading our token back. Safety does not depend on it (see _try_lease); a
# registry slower than this per request only makes writers withdraw and retry.
LEASE_SETTLE_S = 0.5
POLL_S = 0.2


class LockTimeout(RuntimeError):
    """Another process held the registry lock for longer than `lock_timeout_s`."""


class LockLost(RuntimeError):
    """Our remote lease expired or was taken over while we held it: nothing may be written."""


class Held:
    """A held registry lock; `check()` raises LockLost if it is no longer ours."""

    def __init__(self, check=None):
        self._check = check

    def check(self) -> None:
        if self._check is not None:
            self._check()


@contextlib.contextmanager
def registry_lock(client: MlflowClient, tracking: TrackingSettings, settings: RegistrySettings):
    """Hold the registry lock of `settings.model_name` for the duration of the block."""
    uri = tracking.resolved_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///") + f".{settings.model_name}.lock")
        with file_lock(path, settings.lock_timeout_s):
            yield Held()  # the kernel keeps an flock for as long as the process lives
    else:
        with tag_lease(client, settings) as held:
            yield held


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float):
    """An exclusive `fcntl.flock` on `path` (created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"registry lock {path} held for over {timeout_s:.0f}s") from None
                time.sleep(POLL_S)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def tag_lease(client: MlflowClient, settings: RegistrySettings):
    """A lease in a registered-model tag: write, settle, read back; retry until it is ours."""
    owner = uuid.uuid4().hex
    deadline = time.monotonic() + settings.lock_timeout_s
    while not _try_lease(client, settings, owner):
        if time.monotonic() > deadline:
            raise LockTimeout(
                f"registry lease on {settings.model_name} held for over {settings.lock_timeout_s:.0f}s"
            )
        time.sleep(POLL_S)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(client, settings, owner, stop), daemon=True)
    beat.start()
    try:
        yield Held(lambda: _check_owner(client, settings, owner))
    finally:
        stop.set()
        beat.join()
        _withdraw(client, settings, owner)


def _heartbeat(client: MlflowClient, settings: RegistrySettings, owner: str, stop: threading.Event) -> None:
    """Renew our lease every third of its lifetime until `stop`; two missed beats still leave
    a third of the lease, and `Held.check()` catches a lease that was lost anyway."""
    while not stop.wait(settings.lease_s / 3):
        try:
            if _lease_owner(client, settings) != owner:
                log.error("registry lease on %s lost: another writer holds it", settings.model_name)
                return
            _write_lease(client, settings, owner)
        except Exception:  # noqa: BLE001 - a missed beat is retried; check() has the last word
            log.warning("could not renew the registry lease", exc_info=True)


def _check_owner(client: MlflowClient, settings: RegistrySettings, owner: str) -> None:
    if _lease_owner(client, settings) != owner:
        raise LockLost(f"the registry lease on {settings.model_name} expired or was taken over")


def _write_lease(client: MlflowClient, settings: RegistrySettings, owner: str) -> None:
    lease = {"owner": owner, "expires": time.time() + settings.lease_s}
    client.set_registered_model_tag(settings.model_name, LEASE_TAG, json.dumps(lease))


def _try_lease(client: MlflowClient, settings: RegistrySettings, owner: str) -> bool:
    """Read free -> write our token -> settle -> read it back.

    Safe on a linearizable store whatever the request latency: a writer whose read-to-write
    gap exceeded the settle time withdraws, so a later writer cannot overwrite a holder that
    already read its own token back (that would need a gap longer than the holder's settle).
    """
    started = time.monotonic()
    holder = _lease_owner(client, settings)
    if holder not in (None, owner):
        return False
    try:
        _write_lease(client, settings, owner)
    except MlflowException as exc:  # writers racing to create the tag: the server's insert fails
        log.debug("lease write refused (%s); retrying", exc.error_code)
        return False
    if time.monotonic() - started >= LEASE_SETTLE_S:
        _withdraw(client, settings, owner)
        return False
    time.sleep(LEASE_SETTLE_S)
    return _lease_owner(client, settings) == owner


def _withdraw(client: MlflowClient, settings: RegistrySettings, owner: str) -> None:
    """Remove our token if it is still there (a slow write must not block others)."""
    if _lease_owner(client, settings) == owner:
        client.delete_registered_model_tag(settings.model_name, LEASE_TAG)


def _lease_owner(client: MlflowClient, settings: RegistrySettings) -> str | None:
    """The owner of a live lease, or None when there is none or it has expired."""
    raw = client.get_registered_model(settings.model_name).tags.get(LEASE_TAG)
    if not raw:
        return None
    lease = json.loads(raw)
    return lease["owner"] if lease.get("expires", 0) > time.time() else None


@contextlib.contextmanager
def interrupts_deferred():
    """Hold back SIGINT/SIGTERM during the block; yields the list of signals that arrived.

    Nothing is raised for them: the caller knows what the block completed and reports it.
    Only the main thread can install signal handlers; elsewhere this does nothing.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    handlers = {
        sig: signal.signal(sig, lambda s, _f: received.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield received
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
