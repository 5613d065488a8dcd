"""How an HTTP front reaches the model: BentoML's client to the model process, or the
model itself in the front's own process (`--one-process`).

Two processes (the default) keep the fronts free of any ML framework (~110 MB each), let
several fronts take HTTP for one model process, so batches form in one place, and let a
model process restart while the fronts answer 503. One process saves the second hop:
the pickled hand-over, a second HTTP request and BentoML's per-request work in the model
process (metrics, access log): a lone request answers ~4 ms sooner. Under load it
is slower: HTTP handling, the front's work and the batch then share one interpreter and its GIL
(docs/benchmarks.md's run 3 of 2026-12-01, in git history: commit 821bf54). The front's code is
the same either way: it calls a `ModelLink`.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class ModelLink(Protocol):
    """The model's three calls, awaited on a front's event loop (its routes are async:
    no thread hop per request)."""

    async def classify(self, images: list[bytes], k: int) -> list[dict]: ...

    async def explain(self, image: bytes) -> dict: ...

    async def describe(self) -> dict: ...


class RemoteLink:
    """The model process, through the BentoML client of `bentoml.depends`.

    The client pools keep-alive connections for 15 s (aiohttp's default) and the model
    process's server closes an idle one after 5 s (uvicorn's): a request sent on a
    connection just as it is closed fails with a connection error. The three calls only
    read, so such a failure is retried once, on a fresh connection; a second one is the
    model process down or restarting (a 503, service/limits.py)."""

    def __init__(self, proxy: Any):
        self._async = proxy.to_async

    async def classify(self, images: list[bytes], k: int) -> list[dict]:
        return await self._call("classify", images=images, k=k)

    async def explain(self, image: bytes) -> dict:
        return await self._call("explain", image=image)

    async def describe(self) -> dict:
        return await self._call("describe")

    async def _call(self, name: str, **kwargs: Any) -> Any:
        import aiohttp

        try:
            return await getattr(self._async, name)(**kwargs)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            logger.info(
                "the model process connection broke (%s: %s): sending %s again", type(exc).__name__, exc, name
            )
            return await getattr(self._async, name)(**kwargs)


class LocalLink:
    """The model in this process: its batcher and heatmap lane live on the same event loop
    as the front's routes, which await them directly."""

    def __init__(self, model: Any):
        self.model = model

    async def classify(self, images: list[bytes], k: int) -> list[dict]:
        return await self.model.classify_here(images, k)

    async def explain(self, image: bytes) -> dict:
        return await self.model.explain_here(image)

    async def describe(self) -> dict:
        return self.model.status()
