"""How an HTTP front reaches the model: BentoML's client to the model process, or the
model itself in the front's own process (`--one-process`).

Two processes (the default) keep the fronts free of any ML framework (~110 MB each), let
several fronts decode for one model process, so batches form in one place, and let a
model process restart while the fronts answer 503. One process saves the second hop:
the pickled hand-over, a second HTTP request and BentoML's per-request work in the model
process (metrics, access log): a lone request answers ~4 ms sooner. Under load it
is slower: HTTP handling, decodes and the batch then share one interpreter and its GIL
(docs/benchmarks.md, "Serving beside LitServe and Ray Serve", run 3). The front's code is
the same either way: it calls a `ModelLink`.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class ModelLink(Protocol):
    """The model's three calls, made from a front's worker thread."""

    def classify(self, images: list[list[np.ndarray]]) -> list[dict]: ...

    def heatmap(self, image: list[np.ndarray]) -> dict: ...

    def describe(self) -> dict: ...


class RemoteLink:
    """The model process, through the BentoML client of `bentoml.depends`."""

    def __init__(self, proxy: Any):
        self._sync = proxy.to_sync

    def classify(self, images: list[list[np.ndarray]]) -> list[dict]:
        return self._sync.classify(images)

    def heatmap(self, image: list[np.ndarray]) -> dict:
        return self._sync.heatmap(image)

    def describe(self) -> dict:
        return self._sync.describe()


class LocalLink:
    """The model in this process. Its batcher and heatmap lane live on the server's event
    loop, so a front thread hands each call to that loop and waits (anyio's portal: the
    routes are sync FastAPI routes, run on anyio worker threads); `describe` only reads
    memory and is answered on the calling thread."""

    def __init__(self, model: Any):
        self.model = model

    def classify(self, images: list[list[np.ndarray]]) -> list[dict]:
        import anyio.from_thread

        return anyio.from_thread.run(self.model.classify_here, images)

    def heatmap(self, image: list[np.ndarray]) -> dict:
        import anyio.from_thread

        return anyio.from_thread.run(self.model.heatmap_here, image)

    def describe(self) -> dict:
        return self.model.status()
