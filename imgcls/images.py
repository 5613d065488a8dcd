"""The one image preprocessing used outside the Keras graph: decode, to RGB, resize.

`model_input` gives a model its input. Training writes every image of a split through it
(as lossless model-size PNGs that `image_dataset_from_directory` then reads unchanged) and
the service calls it on each upload, so both see identical pixels: one decoder (Pillow),
one resize (Pillow's, in 8 bits), one rounding. No ML framework is imported here, so an
HTTP front that only decodes and resizes stays small.

Memory per image is bounded: 16-bit samples are narrowed in integers, strip by strip; a
large JPEG is decoded at a reduced scale (DCT scaling) near the size the model needs; any
other image is shrunk by whole factors per axis, in 8 bits, before it becomes RGB.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

# Pillow's own default bomb guard is ~89 MP; serving sets a tighter one.
DEFAULT_MAX_PIXELS = 40_000_000
# The formats training and serving accept; Pillow is never asked to try another decoder.
# Left out on purpose: ICO/CUR (Pillow decodes the embedded image inside Image.open,
# before the pixel check), EPS/PS/PDF (Ghostscript), DDS, PSD, SGI, TGA, PCX and the rest
# of Pillow's long tail: rarely photos, and each is more decoder code facing the network.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
# The pixels a model is trained on: 3 = version 2 plus the EXIF orientation applied (the
# photo upright, as a person sees it); 2 = this module's Pillow resize (whole-factor
# reduce, then antialiased bilinear, JPEG draft decoding), pixels as stored; 1 = the Keras
# bilinear resize before it. Files without an EXIF orientation give the same pixels in 2 and 3.
PREPROCESSING_VERSION = 3
# EXIF Orientation (tag 0x0112) -> the transpose that makes the image upright, as
# Pillow's ImageOps.exif_transpose does it; 5-8 swap width and height.
_EXIF_ORIENTATION = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Whole-factor reduction stops within this many times the model size; Pillow's bilinear
# (antialiased) resize does the rest. 3: Pillow's docs call it indistinguishable from a
# full-size resize, while a 40 MP image never reaches the resize at full size.
REDUCING_GAP = 3
# Pixels narrowed from 16 to 8 bits per step: bounds the temporary copies (~8 MB).
_STRIP_PIXELS = 1 << 20
# What Pillow's decoders raise on malformed data (fuzzing found most of them); caught only
# around calls into Pillow, so a bug in this project's own code is still a 500.
_DECODER_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    NotImplementedError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    MemoryError,
)


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message says why, for a 4xx or a CLI line."""


class UnsupportedFormatError(ImageDecodeError):
    """An image in a format outside ACCEPTED_FORMATS (the service answers 415)."""


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, target: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode image bytes to an (H, W, 3) uint8 RGB array, upright.

    Greyscale, palette, RGBA, CMYK and 16-bit images become 8-bit RGB; animated images
    give their first frame. The EXIF orientation is applied (as Pillow's
    `ImageOps.exif_transpose`), in training and serving alike, so both see the photo as a
    person does. Raises ImageDecodeError for empty, unrecognised, truncated, corrupt or
    oversized images (`max_pixels` is checked from the header, before any pixel is
    decoded) and UnsupportedFormatError for formats outside ACCEPTED_FORMATS.

    `target` = (height, width) of the model: the image is decoded and shrunk (JPEG draft,
    whole-factor reduction) to near that size, for `prepare_image`; the turn is applied to
    the shrunk image, so it costs a copy of that, not of the full-size one. Without it,
    full size.
    """
    with _open(data, max_pixels) as img:
        with _decoder_errors():
            img.seek(0)
            turn = _UPRIGHT.get(_orientation(img))
            stored = _stored_target(target, turn) if target else None
            if stored is not None:
                img.draft("RGB", (stored[1], stored[0]))  # JPEG only: DCT scaling, >= target
            img.load()
        small = _shrink(_to_rgb_or_grey(_to_8_bits(img)), stored) if stored else _to_8_bits(img)
        with _decoder_errors():
            upright = small.transpose(turn) if turn is not None else small
            return np.asarray(_to_rgb(upright), dtype=np.uint8)


def _orientation(img: Image.Image, *, header_only: bool = False) -> int | None:
    """The EXIF orientation (2-8) of an opened image; 1 when absent or unreadable.

    A PNG may keep its EXIF after the pixels, where Pillow reads it by decoding them;
    `header_only` never decodes and then answers None for a PNG whose header has none
    (the orientation is unknown until the pixels are read).
    """
    try:
        if header_only:
            if img.format == "PNG" and "exif" not in img.info:
                return None
            exif = Image.Image.getexif(img)  # the base method: no PNG load
        else:
            exif = img.getexif()
        value = exif.get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block only loses the turn
        return 1
    return value if value in _UPRIGHT else 1


def _stored_target(target: tuple[int, int], turn: Image.Transpose | None) -> tuple[int, int]:
    """The model's (height, width) in the stored image's axes: swapped by a quarter turn."""
    quarter = (
        Image.Transpose.TRANSPOSE,
        Image.Transpose.ROTATE_270,
        Image.Transpose.TRANSVERSE,
        Image.Transpose.ROTATE_90,
    )
    return (target[1], target[0]) if turn in quarter else target


def decode_preview(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = 1024) -> np.ndarray:
    """Decode image bytes to (H, W, 3) uint8 RGB at most `max_side` on the long side (for
    Grad-CAM overlays: a picture for eyes, bounded in memory like `decode_image`)."""
    with _open(data, max_pixels) as img:
        width, height = img.size
        if _orientation(img, header_only=True) in (5, 6, 7, 8):  # the box is asked for upright
            width, height = height, width
    scale = max(width, height) / max_side
    box = (max(1, round(height / scale)), max(1, round(width / scale))) if scale > 1 else None
    pixels = decode_image(data, max_pixels=max_pixels, target=box)
    preview = Image.fromarray(pixels)
    preview.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return np.asarray(preview)


def prepare_image(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 pixels -> the model's `size` = (height, width), uint8.

    Shrunk by whole factors per axis to within REDUCING_GAP times the size (a box filter
    in 8 bits, whatever the aspect ratio), then resized by Pillow's bilinear filter, which
    is antialiased when it shrinks. All in 8-bit integers: the result is exactly
    representable as a PNG, so training can store it. Applying it to `decode_image(...,
    target=size)` or to the full-size pixels of a non-JPEG without an EXIF turn gives the
    same result.
    """
    height, width = size
    img = _shrink(Image.fromarray(np.asarray(pixels, dtype=np.uint8)), size)
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def decode_cost(
    data: bytes, target: tuple[int, int] | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> int:
    """About the most bytes `decode_image(data, target=target)` holds at once, from the
    header alone (no pixel decoded): 4 bytes a decoded pixel (Pillow's RGB), plus the
    upright copy of the (shrunk) image when an EXIF orientation turns it, plus the data.
    Raises ImageDecodeError as `decode_image` would for a refused or oversized header."""
    with _open(data, max_pixels) as img:
        width, height = img.size
        orientation = _orientation(img, header_only=True)  # None: a PNG may still turn
        stored = _stored_target(target, _UPRIGHT.get(orientation)) if target else None
        if stored is not None and img.format in ("JPEG", "MPO"):
            scale = _draft_scale(img.size, stored)
            width, height = -(-width // scale), -(-height // scale)
    decoded = 4 * width * height
    if orientation == 1:
        return decoded + len(data)
    if stored is not None:  # the turn copies the image `_shrink` made (either axis order)
        fx = max(1, width // (REDUCING_GAP * max(stored)))
        fy = max(1, height // (REDUCING_GAP * max(stored)))
        return decoded + 4 * -(-width // fx) * -(-height // fy) + len(data)
    return 2 * decoded + len(data)


def model_input(data: bytes, size: tuple[int, int], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image bytes -> the model's (H, W, 3) uint8 input: what training stores and serving
    sends. Raises ImageDecodeError."""
    return prepare_image(decode_image(data, max_pixels=max_pixels, target=size), size)


def resize_image(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Decoded pixels -> the model's float32 (H, W, 3) input (see `prepare_image`)."""
    return prepare_image(pixels, size).astype(np.float32)


def load_image(data: bytes, size: tuple[int, int], **kwargs) -> np.ndarray:
    """Image bytes -> the model's float32 (H, W, 3) input; raises ImageDecodeError."""
    return model_input(data, size, **kwargs).astype(np.float32)


def accepted_extensions() -> tuple[str, ...]:
    """File name endings of ACCEPTED_FORMATS (".jpg", ".png", ...), as Pillow registers them."""
    accepted = {*ACCEPTED_FORMATS, "MPO"}  # MPO: a JPEG with extra frames (phone cameras)
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in accepted))


def image_format(data: bytes) -> str | None:
    """The Pillow format name of `data` from its first bytes (no decoding), or None."""
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        with contextlib.suppress(Exception):  # a plugin's magic check on odd bytes
            if accept is not None and accept(prefix):
                return name
    return None


@contextlib.contextmanager
def _open(data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """Pillow's lazy image (header read, no pixels) of an accepted format, size checked."""
    if not data:
        raise ImageDecodeError("empty upload: no image bytes")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; a bomb is an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image is too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise _unidentified(data) from exc
    except _DECODER_ERRORS as exc:
        raise ImageDecodeError(f"image is truncated or corrupt: {exc}") from exc
    with img:
        _check_pixel_count(img.size, max_pixels)
        yield img


def refused_format(data: bytes) -> str | None:
    """The reason an image in a format outside ACCEPTED_FORMATS is refused, or None (not a
    known image format, or an accepted one). Reads the first bytes only."""
    fmt = image_format(data)
    if fmt is None or fmt in ACCEPTED_FORMATS:
        return None
    return f"image format {fmt} is not accepted (accepted: {', '.join(ACCEPTED_FORMATS)})"


def _unidentified(data: bytes) -> ImageDecodeError:
    fmt = image_format(data)
    if fmt is None:
        return ImageDecodeError("not an image: the file format was not recognised")
    if fmt in ACCEPTED_FORMATS:
        return ImageDecodeError(f"image is truncated or corrupt: not a readable {fmt} file")
    return UnsupportedFormatError(refused_format(data))


@contextlib.contextmanager
def _decoder_errors() -> Iterator[None]:
    """Pillow's failures on malformed data as ImageDecodeError (a 4xx, not a 500)."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image is too large to decode safely: {exc}") from exc
    except MemoryError as exc:
        raise ImageDecodeError("image is corrupt: its header asks for too much memory") from exc
    except _DECODER_ERRORS as exc:
        raise ImageDecodeError(f"image is truncated or corrupt: {type(exc).__name__}: {exc}") from exc


def _check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    """Refuse an image whose header announces more than `max_pixels` (decompression bomb)."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )


def _to_8_bits(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale ("I;16*", "I", "F") as 8-bit "L"; other modes as they are."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    width, height = img.size
    out = np.empty((height, width), np.uint8)
    rows = max(1, _STRIP_PIXELS // width)
    for top in range(0, height, rows):
        with _decoder_errors():
            strip = np.asarray(img.crop((0, top, width, min(height, top + rows))))
        out[top : top + rows] = _high_byte(strip)
    return Image.fromarray(out)


def _high_byte(values: np.ndarray) -> np.ndarray:
    """16-bit samples to 8 bits as TensorFlow does it: a right shift by 8, floor(x / 256).
    Integer samples stay integers; 32-bit ones are clipped to 0-65535 first."""
    if values.dtype.kind == "f":  # "F" (float32 TIFF): floor, as the integer shift does
        values = np.nan_to_num(values).clip(0, 65535).astype(np.uint32)
    return (np.clip(values, 0, 65535) >> 8).astype(np.uint8)


def _to_rgb_or_grey(img: Image.Image) -> Image.Image:
    """ "L" and "RGB" as they are, everything else as RGB: the modes `_shrink` can reduce
    exactly as it would the RGB image (a grey image is shrunk before it is tripled)."""
    if img.mode in ("L", "RGB"):
        return img
    with _decoder_errors():
        return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, the way training's decoder produces it (alpha is dropped, not composited)."""
    if img.mode == "P" and "transparency" in img.info:
        # Through RGBA so the palette's colours are kept and the alpha is dropped.
        img = img.convert("RGBA")
    return img.convert("RGB") if img.mode != "RGB" else img


def _draft_scale(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The DCT scale Pillow's JPEG draft mode picks for `target` (1, 2, 4 or 8)."""
    scale = min(size[0] // target[1], size[1] // target[0])
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def _shrink(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Reduce by whole factors per axis (box filter) to within REDUCING_GAP x `size`.

    Idempotent: a reduced image is under twice REDUCING_GAP x `size`, so it is not reduced
    again, which is why `prepare_image` gives the same result on shrunk or full pixels.
    """
    height, width = size
    fx = max(1, img.size[0] // (REDUCING_GAP * width))
    fy = max(1, img.size[1] // (REDUCING_GAP * height))
    return img.reduce((fx, fy)) if fx > 1 or fy > 1 else img
