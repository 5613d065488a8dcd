"""Progress of long work: a bar on a terminal, a plain log line about every 10 s elsewhere.

`imgcls predict`, the frozen-backbone pass and the evaluation of a split share it. When
stdout is a terminal, a rich bar shows done/total, the rate and the time left, and goes
away when the work ends (the caller says what was done). In a log file or CI, a log line
says the same at most every `IMGCLS_PROGRESS_EVERY_S` seconds (read when the work starts),
and a last line gives the totals once any line was written: work shorter than that stays
silent, as before.
"""

from __future__ import annotations

import logging
import os
import time

ENV_EVERY_S = "IMGCLS_PROGRESS_EVERY_S"
# Seconds between log lines: a CI log shows the work is alive without a line per batch.
EVERY_S = 10.0

_log = logging.getLogger(__name__)


def status_line(label: str, done: int, total: int | None, unit: str, seconds: float) -> str:
    """`label: 320/2100 images (15%), 26.1 images/s, 1:08 left` (no total: `label: 320 images, ...`)."""
    rate = done / seconds if seconds > 0 else 0.0
    count = f"{done}/{total} {unit} ({done / total:.0%})" if total else f"{done} {unit}"
    left = f", {_clock((total - done) / rate)} left" if total and rate else ""
    return f"{label}: {count}, {rate:.1f} {unit}/s{left}"


def final_line(label: str, done: int, total: int | None, unit: str, seconds: float) -> str:
    """`label: 2100/2100 images in 80.4 s (26.1 images/s)`."""
    rate = done / seconds if seconds > 0 else 0.0
    count = f"{done}/{total}" if total else f"{done}"
    return f"{label}: {count} {unit} in {seconds:.1f} s ({rate:.1f} {unit}/s)"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


class Progress:
    """`with Progress("predict", len(files)) as progress: ... progress.advance(n)`.

    `total`: the units of work (None when unknown: no percentage or time left); `unit`
    names them in the line; `logger`: whose log lines they are (the caller's module's).
    """

    def __init__(
        self, label: str, total: int | None, unit: str = "images", logger: logging.Logger | None = None
    ):
        self.label, self.total, self.unit = label, total, unit
        self.log = logger or _log
        self.done, self.lines = 0, 0
        self._bar = self._task = None

    def __enter__(self) -> Progress:
        from rich.console import Console

        self.start = self._last = time.perf_counter()
        self.every_s = float(os.environ.get(ENV_EVERY_S) or EVERY_S)
        console = Console()
        if console.is_terminal:
            self._bar = _rich_bar(console, self.label, self.unit)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total)
        return self

    def advance(self, units: int = 1) -> None:
        """`units` more done: the bar moves, or a log line when `every_s` has passed."""
        self.done += units
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self.lines += 1
            self.log.info("%s", status_line(self.label, self.done, self.total, self.unit, now - self.start))

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.lines and exc[0] is None:
            seconds = time.perf_counter() - self.start
            self.log.info("%s", final_line(self.label, self.done, self.total, self.unit, seconds))


def _rich_bar(console, label: str, unit: str):
    """A transient rich bar: label, bar, done/total, rate, time left."""
    from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} {unit}/s" if task.speed else "", style="progress.data.speed")

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), RateColumn(), TimeRemainingColumn())
    return RichProgress(*columns, console=console, transient=True)
