"""A terminal that shows what a user can act on: the noise filters of the `imgcls` command.

Only lines a user cannot act on are hidden, each by its own pattern:
- Python warnings from Keras about how it iterates a dataset;
- lines that TensorFlow's C++ code writes straight to file descriptor 2 through absl
  before Python can configure anything (TensorFlow 2.21 no longer honours
  `TF_CPP_MIN_LOG_LEVEL` for them): absl's "before InitializeLog" banner, the oneDNN
  notice (the optimisation stays on, only its notice goes) and a tf.data graph note about
  `use_unbounded_threadpool`, an attribute its own runtime ignores;
- MLflow's "Successfully registered model" / "Created version" prints (imgcls logs the
  registered version itself).

Every other line, warnings about the data included, reaches the terminal unchanged.
Called by `imgcls.cli.main`; nothing here runs at import.
"""

from __future__ import annotations

import atexit
import os
import re
import select
import sys
import threading
import warnings

# Python warnings (message regexes) a user cannot act on.
PYTHON_NOISE = (
    r"Your input ran out of data; interrupting training",
    r"`shuffle=True` was passed, but will be ignored",
)
# Lines written by native code to fd 2 that a user cannot act on.
NATIVE_NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|I\d{4} [\d:.]+ +\d+ port\.cc:\d+\] oneDNN custom operations are on"
    rb"|E\d{4} [\d:.]+ +\d+ node_def_util\.cc:\d+\] NodeDef mentions attribute use_unbounded_threadpool "
    # MLflow's own prints on registration; imgcls logs the registered version itself.
    rb"|Successfully registered model '[^']*'\.$"
    rb"|Created version '\d+' of model '[^']*'\.$)"
)
# A partial line (no newline yet) is passed on after this long without more output.
_PARTIAL_LINE_WAIT_S = 0.1


def hide_python_noise() -> None:
    """Ignore the Keras warnings of PYTHON_NOISE (and only those) in this process."""
    for message in PYTHON_NOISE:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


class NativeStderrFilter:
    """Route this process's fd 2 through a pipe and drop the lines matching `pattern`.

    Children started afterwards inherit the filtered fd 2. `stop` (also run at exit)
    puts the original stderr back and passes on what is still buffered.
    """

    def __init__(self, pattern: re.Pattern[bytes] = NATIVE_NOISE):
        self.pattern = pattern
        self._original: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> NativeStderrFilter:
        sys.stderr.flush()
        self._original = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self._thread = threading.Thread(target=self._pump, args=(read,), name="stderr-filter", daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        if self._original is None:
            return
        sys.stderr.flush()
        os.dup2(self._original, 2)  # closes this process's write end of the pipe
        if self._thread is not None:
            self._thread.join(timeout=2)  # children still holding the pipe may keep it open
        self._original = None

    def _pump(self, read: int) -> None:
        pending = b""
        while True:
            ready, _, _ = select.select([read], [], [], _PARTIAL_LINE_WAIT_S if pending else None)
            if not ready:  # a partial line and a pause: a prompt or a progress bar
                self._write(pending)
                pending = b""
                continue
            chunk = os.read(read, 65536)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            self._write(b"".join(line + b"\n" for line in lines if not self.pattern.match(line)))
        if pending and not self.pattern.match(pending):
            self._write(pending)
        os.close(read)

    def _write(self, data: bytes) -> None:
        original = self._original
        while data and original is not None:
            try:
                data = data[os.write(original, data) :]
            except OSError:
                return
