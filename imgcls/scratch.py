"""Temporary folders of imgcls: under `IMGCLS_HOME/tmp`, each with its owner's pid, swept
when stale.

The split images of a run (training/data.py) can be gigabytes; in the system's TMPDIR
(often a small tmpfs) a killed run left them behind for good. Under the project folder
they sit next to the data they came from, and the next run removes what a dead one left:

- a folder whose owner (the pid and start time in its `owner.pid`) is gone is stale at once;
- a folder without a readable `owner.pid` is stale once older than STALE_AFTER_S;
- a folder whose owner still runs is kept, however old (a long training run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SCRATCH = "tmp"
OWNER_FILE = "owner.pid"
# A day: longer than any run that could have left a folder without writing its owner
# (that file is written right after the folder is made).
STALE_AFTER_S = 24 * 3600
# Start times read back from /proc may differ from psutil's first read by rounding.
START_TIME_SLACK_S = 1.0


def scratch_root(home: Path) -> Path:
    """`home/tmp`, where imgcls's temporary folders live."""
    return Path(home) / SCRATCH


@contextlib.contextmanager
def scratch_dir(home: Path, prefix: str = "imgcls-") -> Iterator[Path]:
    """A new folder under `home/tmp` owned by this process, removed when the block ends."""
    root = scratch_root(home)
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        (path / OWNER_FILE).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sweep_stale(home: Path, max_age_s: float = STALE_AFTER_S, now: float | None = None) -> list[Path]:
    """Remove the stale folders under `home/tmp` (see the module docstring); returns them."""
    root = scratch_root(home)
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for path in sorted(root.iterdir()):
        if path.is_dir() and _is_stale(path, max_age_s, now):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d stale temporary folder(s) under %s", len(removed), root)
    return removed


def _is_stale(path: Path, max_age_s: float, now: float) -> bool:
    owner = _owner(path)
    if owner is None:
        with contextlib.suppress(OSError):
            return now - path.stat().st_mtime > max_age_s
        return False
    return not _alive(*owner)


def _owner(path: Path) -> tuple[int, float] | None:
    with contextlib.suppress(OSError, ValueError):
        pid, started = (path / OWNER_FILE).read_text().split()
        return int(pid), float(started)
    return None


def _alive(pid: int, started: float) -> bool:
    """True if `pid` runs and is the process that started at `started` (not a reused pid)."""
    now_started = _start_time(pid)
    return now_started is not None and abs(now_started - started) <= START_TIME_SLACK_S


def _start_time(pid: int) -> float | None:
    import psutil

    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).create_time()
    return None
