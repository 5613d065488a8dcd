"""Uploads, from bytes to pixels: checked in the HTTP front, decoded once in the model process.

The front reads an upload's bytes (the byte limit) and checks its header (format, pixel
count) so a bad file gets its 4xx at once; then it forwards the bytes, as received. The
model process decodes each upload once, at its served model's input size
(`imgcls.images.model_input`, training's own preprocessing), on a pool of threads (Pillow
releases the GIL while it decodes and resizes, so the decodes spread over the cores), each
within its decode slots, so its memory stays bounded: a decode reserves, from the image's
header, what it will hold (service.limits.DecodeSlots).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import UploadFile

from imgcls.images import ImageDecodeError, UnsupportedFormatError, decode_cost, decode_preview, model_input
from service.limits import DecodeSlots, Rejected
from service.settings import ServiceSettings


async def read_upload(upload: UploadFile, what: str, settings: ServiceSettings) -> bytes:
    """An upload's bytes, once its header passed: 413 over the byte limit, 415 for a
    refused format, 400 for a header that is not an image's or is over the pixel limit.
    The header is read on the event loop (no pixel is decoded: microseconds)."""
    if upload.size is not None and upload.size > settings.max_upload_bytes:
        raise Rejected(413, f"{what} is over the upload limit of {settings.max_upload_bytes} bytes")
    data = await upload.read()  # from memory, or on a thread where Starlette spooled it to disk
    try:
        decode_cost(data, max_pixels=settings.max_pixels)  # reads the header, decodes nothing
    except ImageDecodeError as exc:
        raise rejection(exc, what, upload.filename) from exc
    return data


def rejection(exc: ImageDecodeError, what: str, filename: str | None) -> Rejected:
    """The 4xx of an image that cannot be used, naming it."""
    return Rejected(refused_status(exc), f"{what} ({filename}): {exc}")


def refused_status(exc: ImageDecodeError) -> int:
    """415 for a format outside the accepted ones, 400 for any other unusable image."""
    return 415 if isinstance(exc, UnsupportedFormatError) else 400


def refuse(reply: dict, what: str, filename: str | None) -> None:
    """Raise the model process's refusal of an upload (service.replies.error_reply), if it
    is one: a 4xx names the upload; a 503 (its decode slots stayed full) does not."""
    if "error" not in reply:
        return
    status, message = reply["status"], reply["error"]
    if status < 500:
        message = f"{what} ({filename}): {message}"
    raise Rejected(status, message, retry_after_s=reply.get("retry_after_s"))


class Decoder:
    """The model process's decodes: model inputs and overlay previews of uploaded bytes,
    within its decode slots, on `max_concurrent_decodes` threads."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.max_pixels = settings.max_pixels
        budget = settings.decode_memory_mib * 2**20
        self.slots = DecodeSlots(settings.max_concurrent_decodes, budget, settings.decode_wait_s)
        self.pool = ThreadPoolExecutor(settings.max_concurrent_decodes, thread_name_prefix="imgcls-decode")

    def model_input(self, data: bytes, size: tuple[int, int]) -> np.ndarray:
        """The model's uint8 (H, W, 3) input, as training made it; raises ImageDecodeError,
        or Rejected(503) when the slots stay full."""
        with self.slots.hold(decode_cost(data, size, max_pixels=self.max_pixels)):
            return model_input(data, size, max_pixels=self.max_pixels)

    def preview(self, data: bytes) -> np.ndarray:
        """A copy at most 1024 px on the long side, to draw the Grad-CAM overlay on."""
        with self.slots.hold(decode_cost(data, max_pixels=self.max_pixels)):
            return decode_preview(data, max_pixels=self.max_pixels)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
