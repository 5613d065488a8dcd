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

Every other line, warnings about the data included, reaches the terminal unchanged, and
each line whole: `whole_lines` keeps a printed line in one write, and the log lines of
Python's `logging` go to the terminal directly (`NativeStderrFilter.log_stream`), in the
order they happen beside prints, not after the filter's relay.
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


def whole_lines(stream) -> None:
    """Make the text `stream` (stdout) write each line in one piece, flushed at its newline.

    Under PYTHONUNBUFFERED (Docker images and CI set it) a stream writes through, and
    `print` writes its text and its newline in two writes: a line relayed to the same
    terminal in between lands after the text ("...mlflow.db20:56:38 INFO ...").
    """
    stream.reconfigure(line_buffering=True, write_through=False)


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

    def log_stream(self):
        """A text stream on the original stderr, for Python's log lines: they hold none of
        the native noise, and written directly they keep their order beside stdout's lines
        (the relay thread would deliver them a moment late, between or after later prints)."""
        if self._original is None:
            raise RuntimeError("log_stream: the filter is not started")
        return os.fdopen(os.dup(self._original), "w", buffering=1, errors="backslashreplace")

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
