"""What the model process answers the HTTP front: each upload decoded once, every answer
computed by one model and naming it.

The front forwards an upload's bytes. The model process decodes them at its served model's
input size, on its decode threads: on the CPU, in the batch, just before its forward pass;
with a GPU (`--gpu`), on arrival, while the previous batch runs there. On the CPU the
forward pass already uses every core: a decode beside it slows it down, and a request shed
in the queue is never decoded (docs/benchmarks.md, "Decodes between forward passes"). The
batch reads the served model once: an image decoded for a model that a swap replaced
meanwhile (another input size) is decoded again from its bytes for the model that now
computes it. A request's images stay together in one batch (service/batching.py), so one
version answers all of them, and each answer names it: no retry, nothing stale.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgcls.images import ImageDecodeError
from service.limits import Rejected
from service.metrics import observe_forward
from service.predictor import Predictor, top_k
from service.uploads import Decoder, refused_status

logger = logging.getLogger(__name__)


@dataclass
class Upload:
    """One uploaded image in the model process: its bytes, its pixels at `size`, the number
    of labels asked for, or why it could not be decoded."""

    data: bytes
    k: int
    pixels: np.ndarray | None = None
    size: tuple[int, int] | None = None
    error: dict[str, Any] | None = None
    reply: dict[str, Any] | None = None
    arrived: float = field(default_factory=time.monotonic)

    def decode(self, decoder: Decoder, size: tuple[int, int]) -> None:
        """Its pixels at `size`, or its `error` reply (a 500 for what no upload should cause)."""
        try:
            self.pixels, self.size = decoder.model_input(self.data, size, self.arrived), size
        except (ImageDecodeError, Rejected) as exc:
            self.error = error_reply(exc)
        except Exception as exc:  # noqa: BLE001 - this image fails, not its batch
            logger.exception("decoding an upload failed")
            self.error = {
                "error": f"decoding failed: {type(exc).__name__}",
                "status": 500,
                "retry_after_s": None,
            }


async def decode_uploads(decoder: Decoder, blobs: list[bytes], k: int, size: tuple[int, int]) -> list[Upload]:
    """The uploads of one request, decoded side by side on the decoder's threads."""
    loop = asyncio.get_running_loop()
    uploads = [Upload(data, k) for data in blobs]
    await asyncio.gather(*(loop.run_in_executor(decoder.pool, u.decode, decoder, size) for u in uploads))
    return uploads


def classify_uploads(predictor: Predictor, uploads: list[Upload], decoder: Decoder, step: int) -> list[dict]:
    """One reply per upload, all computed by `predictor`, in forward passes of at most
    `step` images: its top-k labels, or the error that kept it from being decoded. Uploads
    not decoded yet at its input size are decoded first (a lone one on this thread)."""
    size = tuple(predictor.card.image_size)
    stale = [u for u in uploads if u.error is None and u.size != size]
    if len(stale) == 1:
        stale[0].decode(decoder, size)
    else:
        list(decoder.pool.map(lambda upload: upload.decode(decoder, size), stale))
    fits = [u for u in uploads if u.error is None]
    origin = model_origin(predictor)
    for start in range(0, len(fits), step):
        chunk = fits[start : start + step]
        batch, started = np.stack([u.pixels for u in chunk]), time.perf_counter()
        probs = predictor.probabilities(batch)
        observe_forward(time.perf_counter() - started)
        for upload, row in zip(chunk, probs, strict=True):
            preds = top_k(row, predictor.card.class_names, upload.k)
            upload.reply = {**origin, "predictions": preds, "batch": len(chunk)}
    return [u.error or u.reply for u in uploads]


def error_reply(exc: ImageDecodeError | Rejected) -> dict[str, Any]:
    """Why an upload was not classified, for the front to answer (service.uploads.refuse)."""
    if isinstance(exc, Rejected):
        return {"error": exc.message, "status": exc.status, "retry_after_s": exc.retry_after_s}
    return {"error": str(exc), "status": refused_status(exc), "retry_after_s": None}


def model_origin(predictor: Predictor) -> dict[str, Any]:
    """What every answer says of the model that computed it."""
    return {
        "model": predictor.name,
        "version": predictor.version,
        "runtime": predictor.runtime.name,
        "precision": predictor.runtime.precision,
    }
