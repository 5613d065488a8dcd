"""Named fault-injection seams: a test makes a step fail, hang or die without patching code.

A step calls `hook("name")`; the variable `IMGCLS_HOOK_<NAME>` (read at that moment) says
what happens there:

- unset or empty: nothing (the normal case; one environment look-up);
- `fail`: raise `HookFault`;
- `kill`: SIGKILL this process on the spot, as the OOM killer or a power cut would;
- `sleep:<seconds>`: wait that long, then go on;
- `hold:<path>`: wait while the file `<path>` exists (at most `HOLD_LIMIT_S`), then go on.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

PREFIX = "IMGCLS_HOOK_"
# A held step gives up waiting after this, so a forgotten hold file cannot hang a server.
HOLD_LIMIT_S = 120.0


class HookFault(RuntimeError):
    """The failure a `fail` hook injects."""


def hook(step: str) -> None:
    """Run the action `IMGCLS_HOOK_<STEP>` names, if any (see the module docstring)."""
    action = os.environ.get(PREFIX + step.upper(), "")
    if not action:
        return
    kind, _, arg = action.partition(":")
    if kind == "fail":
        raise HookFault(f"injected failure at step {step!r}")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "sleep":
        time.sleep(float(arg))
    elif kind == "hold":
        _hold(Path(arg))
    else:
        raise ValueError(f"{PREFIX}{step.upper()}={action!r}: expected fail, kill, sleep:S or hold:PATH")


def _hold(path: Path) -> None:
    deadline = time.monotonic() + HOLD_LIMIT_S
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
