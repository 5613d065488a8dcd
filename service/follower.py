"""Follow the registry: the model process serves whatever the champion pointer says.

A `Follower` holds the served model (`Served`: a `Predictor` with when and where it was
loaded) and, on a thread started by BentoML's `on_startup` hook, asks its source every
`poll_interval_s` which version is champion. On a change it loads that exact version,
checks it against its card, warms it up beside the old one and only then swaps one
reference (TF Serving's availability-preserving policy): requests already running finish
on the model they read, and every answer names the version that computed it. A version
that fails to load or to pass the checks is never served; the old one keeps answering and
the check is retried with backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from service.compiled import falling_back
from service.predictor import Predictor

logger = logging.getLogger(__name__)

# Retries of a version that failed: double the wait each time, from one poll interval up
# to this, so a broken champion costs a few loads an hour, not one per poll.
MAX_BACKOFF_S = 300.0
# Class-set changes and failures kept for /metadata.
RECENT_EVENTS = 10


class ModelRejected(RuntimeError):
    """A loaded model does not match its card (input size, number of classes)."""


class Source(Protocol):
    """Where the champion pointer and the models live (see service/sources.py)."""

    kind: str

    def champion(self) -> str:
        """The key of the version to serve now (a registry version or a store tag)."""

    def load(self, key: str) -> Predictor:
        """The model behind `key`, with its card and registry version (not warmed up)."""

    def compile(self, key: str, predictor: Predictor) -> None:
        """Give the loaded model its verified compiled build, kept per version (optional:
        a source without it serves Keras)."""


@dataclass(frozen=True)
class Served:
    """The model being served and where it came from."""

    predictor: Predictor
    key: str
    origin: str  # "mlflow", "bentoml", or "cache" when the registry could not be reached
    loaded_at: str = field(default_factory=lambda: _now())

    def describe(self) -> dict[str, Any]:
        return {**self.predictor.metadata(), "loaded_at": self.loaded_at, "origin": self.origin}


def check_model(predictor: Predictor) -> None:
    """Raise ModelRejected unless the model's input and output agree with its card."""
    card, model = predictor.card, predictor.model
    size = tuple(model.input_shape[1:3])
    if size != tuple(card.image_size) or model.input_shape[-1] != 3:
        raise ModelRejected(
            f"version {predictor.version}: the model takes {model.input_shape[1:]}, "
            f"its card says {tuple(card.image_size)} RGB"
        )
    if model.output_shape[-1] != len(card.class_names):
        raise ModelRejected(
            f"version {predictor.version}: the model has {model.output_shape[-1]} outputs, "
            f"its card names {len(card.class_names)} classes"
        )


def prepare(predictor: Predictor, source: Any = None, key: str | None = None) -> Predictor:
    """Check a freshly loaded model against its card, give it the compiled build its
    source keeps for `key` (checked against it) and warm it up; the model to serve."""
    check_model(predictor)
    compile_build = getattr(source, "compile", None)
    if compile_build is not None:
        with falling_back(predictor):
            compile_build(key, predictor)
    predictor.warm_up()
    return predictor


class Follower:
    """The served model, kept equal to the source's champion by `check()` or a thread.

    `check()` is one poll step (observe, compare, act) a test can call directly; `start()`
    runs it every `poll_interval_s` seconds (0: never) on a daemon thread until `stop()`.
    """

    def __init__(self, source: Source, served: Served, poll_interval_s: float, metrics: Any = None):
        self.source = source
        self.poll_interval_s = poll_interval_s
        self._served = served
        self._metrics = metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: dict[str, tuple[int, float]] = {}  # key -> (failures, retry at)
        self.swaps = 0
        self.failures = 0
        self.last_check: str | None = None
        self.last_error: str | None = None
        self.last_load_s: float | None = None  # download + load + check + warm-up of the last swap
        self.class_changes: deque[dict] = deque(maxlen=RECENT_EVENTS)
        self.failed_loads: deque[dict] = deque(maxlen=RECENT_EVENTS)
        if metrics is not None:
            metrics.served(served.predictor)

    @property
    def served(self) -> Served:
        """The model to use for one whole request: read it once, then use that object."""
        return self._served

    def check(self, now: float | None = None) -> bool:
        """Poll once: swap to the champion if it changed; returns whether a swap happened."""
        now = time.monotonic() if now is None else now
        try:
            key = self.source.champion()
        except Exception as exc:  # noqa: BLE001 - an unreachable registry keeps the model
            self._note_error(f"cannot read the champion: {exc}")
            return False
        self.last_check = _now()
        if key == self._served.key:
            self.last_error = None
            return False
        failures, retry_at = self._failed.get(key, (0, 0.0))
        if now < retry_at:
            return False
        started = time.monotonic()
        try:
            predictor = prepare(self.source.load(key), self.source, key)
        except Exception as exc:  # noqa: BLE001 - a bad version is never served
            self._record_failure(key, failures + 1, now, exc)
            return False
        self.last_load_s = round(time.monotonic() - started, 3)
        self._swap(Served(predictor, key, self.source.kind))
        return True

    def _swap(self, new: Served) -> None:
        old = self._served
        self._served = new  # one reference: a request uses the old or the new model, whole
        self._failed.pop(new.key, None)
        self.swaps += 1
        self.last_error = None
        change = _class_change(old.predictor, new.predictor)
        if change:
            self.class_changes.append(change)
            logger.warning(
                "the class set changed from version %s to %s: added %s, removed %s",
                change["from_version"], change["to_version"], change["added"], change["removed"],
            )  # fmt: skip
        logger.info("now serving version %s (was %s)", new.predictor.version, old.predictor.version)
        if self._metrics is not None:
            self._metrics.swapped(old.predictor, new.predictor)

    def _record_failure(self, key: str, failures: int, now: float, exc: Exception) -> None:
        wait = min(MAX_BACKOFF_S, max(self.poll_interval_s, 1.0) * 2 ** (failures - 1))
        self._failed[key] = (failures, now + wait)
        self.failures += 1
        message = f"{type(exc).__name__}: {exc}"
        self.failed_loads.append({"at": _now(), "key": key, "error": message[:500], "retry_in_s": wait})
        self._note_error(f"version {key} was not served: {message}")
        if self._metrics is not None:
            self._metrics.failed()

    def _note_error(self, message: str) -> None:
        self.last_error = message[:500]
        logger.warning("%s; still serving version %s", message, self._served.predictor.version)

    def start(self) -> None:
        """Poll on a daemon thread until `stop()`; nothing when the interval is 0."""
        if self.poll_interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="imgcls-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the thread must outlive any one poll
                logger.exception("registry poll failed")

    def status(self) -> dict[str, Any]:
        """What /metadata shows about following: interval, last check, swaps, failures."""
        return {
            "source": self.source.kind,
            "poll_interval_s": self.poll_interval_s,
            "last_check": self.last_check,
            "last_error": self.last_error,
            "swaps": self.swaps,
            "last_load_s": self.last_load_s,
            "failed_loads": self.failures,
            "recent_failures": list(self.failed_loads),
            "class_set_changes": list(self.class_changes),
        }


def _class_change(old: Predictor, new: Predictor) -> dict | None:
    before, after = old.card.class_names, new.card.class_names
    if list(before) == list(after):
        return None
    return {
        "at": _now(),
        "from_version": old.version,
        "to_version": new.version,
        "added": [c for c in after if c not in before],
        "removed": [c for c in before if c not in after],
        "reordered": set(before) == set(after),
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
