"""The service's own Prometheus metrics, beside BentoML's: predictions, the served version.

Created on first use, not at import: BentoML sets prometheus' multiprocess folder when a
worker starts, and every process writes there, so /metrics adds them up whichever front
or model worker counted.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _prediction_metrics() -> tuple[Any, Any]:
    """Counter of predictions per top-1 class and a histogram of top-1 confidence."""
    import prometheus_client

    counter = prometheus_client.Counter("imgcls_predictions", "Predictions served, by top-1 label", ["label"])
    buckets = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
    histogram = prometheus_client.Histogram(
        "imgcls_prediction_confidence", "Top-1 probability of served predictions", buckets=buckets
    )
    return counter, histogram


@functools.cache
def _forward_seconds() -> Any:
    import prometheus_client

    buckets = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5)
    return prometheus_client.Histogram(
        "imgcls_forward_seconds",
        "Time of each forward pass (one batch) in the serving runtime",
        buckets=buckets,
    )


def observe_forward(seconds: float) -> None:
    """Time one forward pass: what the runtime itself costs per batch, beside what the
    service adds (the access log's /predict and /classify times)."""
    _forward_seconds().observe(seconds)


def observe_prediction(best: dict) -> None:
    """Count one answered image by its top-1 label and confidence."""
    counter, histogram = _prediction_metrics()
    counter.labels(label=best["label"]).inc()
    histogram.observe(best["probability"])


class FollowerMetrics:
    """`imgcls_served_model_info{model,version}` and `imgcls_runtime_info{runtime,precision}`
    (1 while a worker serves it), and counters of swaps, of versions that failed to load or
    to pass the checks, and of versions that serve Keras because their compiled build
    could not (`/metadata` says why)."""

    def __init__(self) -> None:
        import prometheus_client

        # livemax: 1 if any live model worker serves that version, so workers that have
        # not caught up yet show as a second version until they do.
        self.info = prometheus_client.Gauge(
            "imgcls_served_model_info", "Version served by the model workers (1 = served)",
            ["model", "version"], multiprocess_mode="livemax",
        )  # fmt: skip
        self.swaps = prometheus_client.Counter("imgcls_model_swaps", "Champion swaps done without a restart")
        self.failures = prometheus_client.Counter(
            "imgcls_model_load_failures", "Versions that failed to load or to pass the checks"
        )
        self.runtime = prometheus_client.Gauge(
            "imgcls_runtime_info", "What computes the served version's predictions (1 = in use)",
            ["runtime", "precision"], multiprocess_mode="livemax",
        )  # fmt: skip
        self.fallbacks = prometheus_client.Counter(
            "imgcls_compiled_fallbacks", "Versions served by Keras because their compiled build could not"
        )

    def served(self, predictor: Any) -> None:
        self.info.labels(model=predictor.name, version=predictor.version).set(1)
        self.runtime.labels(runtime=predictor.runtime.name, precision=predictor.runtime.precision).set(1)
        if predictor.runtime.fallback:
            self.fallbacks.inc()

    def swapped(self, old: Any, new: Any) -> None:
        self.info.labels(model=old.name, version=old.version).set(0)
        self.runtime.labels(runtime=old.runtime.name, precision=old.runtime.precision).set(0)
        self.served(new)
        self.swaps.inc()

    def failed(self) -> None:
        self.failures.inc()


class BatchMetrics:
    """`imgcls_batch_size` (images per forward pass), `imgcls_batch_wait_seconds` (how
    long the oldest request of a batch queued) and `imgcls_batch_queued_images` (images
    waiting for the model now), from the model process's batcher."""

    def __init__(self) -> None:
        import prometheus_client

        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256)
        self.size = prometheus_client.Histogram("imgcls_batch_size", "Images per model call", buckets=sizes)
        waits = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10)
        self.wait = prometheus_client.Histogram(
            "imgcls_batch_wait_seconds", "Queueing of the oldest request of each batch", buckets=waits
        )
        # livesum: the images waiting in every live model worker together.
        self.queue = prometheus_client.Gauge(
            "imgcls_batch_queued_images", "Images waiting for the model", multiprocess_mode="livesum"
        )

    def observe(self, size: int, oldest_wait_s: float) -> None:
        self.size.observe(size)
        self.wait.observe(oldest_wait_s)

    def queued(self, images: int) -> None:
        self.queue.set(images)
