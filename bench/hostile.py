"""Worst-case uploads at the service's default limits (20 MiB upload, 40 MP): files small on
the wire that decode to the most memory, for the memory benchmark and the memory test.

Each maker returns encoded bytes; `WORST_CASES` names them.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

MEGAPIXELS_40 = 40_000_000
MAX_UPLOAD = 20 * 1024 * 1024


def png_16bit_grey(width: int = 8000, height: int = 5000) -> bytes:
    """A 16-bit greyscale PNG (a smooth ramp, so it compresses to ~100 KB), by hand:
    Pillow cannot write 16-bit greyscale PNGs."""
    row = np.linspace(0, 65535, width).astype(">u2").tobytes()
    compressor, parts = zlib.compressobj(6), []
    for _ in range(height):
        parts.append(compressor.compress(b"\x00" + row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return _png(header, b"".join(parts))


def long_thin_png(width: int = 40_000, height: int = 1000) -> bytes:
    """A 40 MP RGB PNG 40 times wider than high: it must not skip the shrink."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :, 0] = np.linspace(0, 255, width, dtype=np.uint8)
    pixels[::7, :, 2] = 200
    return _encode(pixels, "PNG", compress_level=1)


def photo_jpeg(width: int = 4000, height: int = 3000, seed: int = 0) -> bytes:
    """A 12 MP photo-like JPEG (gradients, blobs, sensor noise), quality 90, a few MB."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b = rng.uniform(0, 255, 2)
        img[..., c] = a * (1 - yy) + b * xx
    for _ in range(6):
        cy, cx, r = rng.uniform(0, 1, 3) * (0.75, 1, 0.3)
        img[((yy - cy) ** 2 + (xx - cx) ** 2) < r**2] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return _encode(np.clip(img, 0, 255).astype(np.uint8), "JPEG", quality=90)


def max_png(pixels: int = MEGAPIXELS_40, upload_bytes: int = MAX_UPLOAD) -> bytes:
    """An RGB PNG of just under `pixels` pixels and just under `upload_bytes` bytes: flat
    but for enough rows of noise to fill the upload."""
    width = 7300
    height = pixels // width
    noisy_rows = int(0.95 * upload_bytes / (3 * width))
    rng = np.random.default_rng(1)
    img = np.full((height, width, 3), 128, np.uint8)
    img[:noisy_rows] = rng.integers(0, 256, (noisy_rows, width, 3), dtype=np.uint8)
    return _encode(img, "PNG", compress_level=1)


WORST_CASES: dict[str, Callable[[], bytes]] = {
    "png16-grey-8000x5000": png_16bit_grey,
    "long-thin-40000x1000": long_thin_png,
    "jpeg-12mp": photo_jpeg,
    "png-max-40mp": max_png,
}


def _png(header: bytes, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encode(pixels: np.ndarray, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **params)
    return out.getvalue()
