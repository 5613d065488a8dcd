"""Uploads, from bytes to pixels: checked in the HTTP front, decoded once in the model process.

The front reads an upload's bytes (the byte limit) and its first bytes (empty, or a format
refused by name: the 4xx at once, on the event loop in O(1)); then it forwards the bytes,
as received, holding at most `front_upload_memory_mib` of them at once. The model process
holds at most `upload_memory_mib` of uploads at once and decodes each upload once, at its
served model's input size (`imgcls.images.model_input`, training's own preprocessing), on a
pool of threads (Pillow releases the GIL while it decodes and resizes, so the decodes spread
over the cores), each within its decode slots, so its memory stays bounded: a decode
reserves, from the image's header, what it will hold (service.limits.DecodeSlots).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import UploadFile

from imgcls.images import (
    ImageDecodeError,
    UnsupportedFormatError,
    decode_cost,
    decode_preview,
    model_input,
    refused_format,
)
from service.limits import DecodeSlots, Rejected
from service.settings import ServiceSettings


async def read_upload(upload: UploadFile, what: str, settings: ServiceSettings) -> bytes:
    """An upload's bytes: 413 over the byte limit, 400 when empty, 415 for a format refused
    by name. Only its first bytes are read here (a header can take seconds to parse: the
    model process does that, on its decode threads, and answers the other 4xx)."""
    if upload.size is not None and upload.size > settings.max_upload_bytes:
        raise Rejected(413, f"{what} is over the upload limit of {settings.max_upload_bytes} bytes")
    data = await upload.read()  # from memory, or on a thread where Starlette spooled it to disk
    if not data:
        raise Rejected(400, f"{what} ({upload.filename}): empty upload: no image bytes")
    if refused := refused_format(data):
        raise Rejected(415, f"{what} ({upload.filename}): {refused}")
    return data


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

    def model_input(self, data: bytes, size: tuple[int, int], since: float | None = None) -> np.ndarray:
        """The model's uint8 (H, W, 3) input, as training made it; raises ImageDecodeError,
        or Rejected(503) when the slots stay full `decode_wait_s` after `since` (when it
        was asked for: a decode that queued for a thread has waited already)."""
        with self.slots.hold(decode_cost(data, size, max_pixels=self.max_pixels), since):
            return model_input(data, size, max_pixels=self.max_pixels)

    def preview(self, data: bytes, since: float | None = None) -> np.ndarray:
        """A copy at most 1024 px on the long side, to draw the Grad-CAM overlay on."""
        with self.slots.hold(decode_cost(data, max_pixels=self.max_pixels), since):
            return decode_preview(data, max_pixels=self.max_pixels)

    def close(self) -> None:
        """Drop the decodes not started (the process is stopping)."""
        self.pool.shutdown(wait=False, cancel_futures=True)


class HeldUploads:
    """The bytes of the uploads a process holds (from arrival to answer), within a
    budget: beyond it, a quick 503. One held alone may exceed it. Used on the event loop
    only, so no lock."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes, self.held_bytes = budget_bytes, 0

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """Room for `nbytes` during the block; raises Rejected(503)."""
        if self.held_bytes and self.held_bytes + nbytes > self.budget_bytes:
            mib = self.budget_bytes // 2**20
            raise Rejected(503, f"the server holds {mib} MiB of uploads already; try again", retry_after_s=1)
        self.held_bytes += nbytes
        try:
            yield
        finally:
            self.held_bytes -= nbytes
