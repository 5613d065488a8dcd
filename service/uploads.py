"""Uploads to pixels in an HTTP front: the byte limit, a decode slot, the 4xx reasons.

Every decode of a front goes through `Uploads`, so its memory stays bounded: each one
reserves, from the image's header, what it will hold (service.limits.DecodeSlots).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from fastapi import UploadFile

from imgcls.images import ImageDecodeError, UnsupportedFormatError, decode_cost, decode_preview, model_input
from service.limits import DecodeSlots, Rejected
from service.settings import ServiceSettings


class Uploads:
    """Model inputs and overlay previews of uploads, within one front's decode slots."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.max_bytes, self.max_pixels = settings.max_upload_bytes, settings.max_pixels
        budget = settings.decode_memory_mib * 2**20
        self.slots = DecodeSlots(settings.max_concurrent_decodes, budget, settings.decode_wait_s)

    def model_input(self, upload: UploadFile, what: str, size: tuple[int, int]) -> np.ndarray:
        """The model's uint8 (H, W, 3) input, as training made it (imgcls.images.model_input)."""
        return self._decoded(
            upload, what, lambda data: model_input(data, size, max_pixels=self.max_pixels), size
        )

    def preview(self, upload: UploadFile, what: str) -> np.ndarray:
        """A copy at most 1024 px on the long side, to draw the Grad-CAM overlay on."""
        return self._decoded(upload, what, lambda data: decode_preview(data, max_pixels=self.max_pixels))

    def _decoded(
        self, upload: UploadFile, what: str, decode: Callable[[bytes], np.ndarray], size=None
    ) -> np.ndarray:
        """`decode(bytes)` of an upload, with room reserved for it in the decode slots (503
        when there is none); 413 over the byte limit, 415 for a refused format, 400 if
        unusable. `size`: what `decode` shrinks to (its cost depends on it)."""
        if upload.size is not None and upload.size > self.max_bytes:
            raise Rejected(413, f"{what} is over the upload limit of {self.max_bytes} bytes")
        upload.file.seek(0)  # read again when a model swap asks for another size
        data = upload.file.read()
        try:
            with self.slots.hold(decode_cost(data, size, max_pixels=self.max_pixels)):
                return decode(data)
        except ImageDecodeError as exc:
            status = 415 if isinstance(exc, UnsupportedFormatError) else 400
            raise Rejected(status, f"{what} ({upload.filename}): {exc}") from exc
