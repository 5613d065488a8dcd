"""The one image preprocessing used outside the Keras graph: decode, to RGB, resize.

`load_image` gives a model its input. Training writes every image of a split through it
(as lossless model-size PNGs that `image_dataset_from_directory` then reads unchanged) and
the service calls it on each upload, so both see identical pixels: one decoder (Pillow),
one resize, one rounding. No TensorFlow import: this runs on any Keras backend.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# Pillow's own default bomb guard is ~89 MP; serving sets a tighter one.
DEFAULT_MAX_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message says why, for a 4xx or a CLI line."""


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an (H, W, 3) uint8 RGB array.

    Greyscale, palette, RGBA, CMYK and 16-bit images become 8-bit RGB; animated images
    give their first frame. EXIF orientation is not applied, as in training (TensorFlow's
    decoder ignores it too), so both sides see the pixels as stored. Raises
    ImageDecodeError for empty, unrecognised, truncated, corrupt or oversized images;
    `max_pixels` is checked from the header, before any pixel is decoded.
    """
    if not data:
        raise ImageDecodeError("empty upload: no image bytes")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; a bomb is an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                _check_pixel_count(img.size, max_pixels)
                img.seek(0)
                return np.asarray(_to_rgb(img), dtype=np.uint8)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image is too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image: the file format was not recognised") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"image is truncated or corrupt: {exc}") from exc


def _check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    """Refuse an image whose header announces more than `max_pixels` (decompression bomb)."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, the way training's decoder produces it (alpha is dropped, not composited)."""
    img.load()
    if img.mode.startswith("I") or img.mode == "F":
        img = Image.fromarray(_high_byte(np.asarray(img)), "L")
    if img.mode == "P" and "transparency" in img.info:
        # Through RGBA so the palette's colours are kept and the alpha is dropped.
        img = img.convert("RGBA")
    return img.convert("RGB") if img.mode != "RGB" else img


def _high_byte(values: np.ndarray) -> np.ndarray:
    """16-bit samples to 8 bits as TensorFlow does it: a right shift by 8, floor(x / 256)."""
    wide = np.clip(np.asarray(values, dtype=np.float64), 0, 65535).astype(np.uint32)
    return (wide >> 8).astype(np.uint8)


def prepare_image(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 pixels -> the model's `size` = (height, width), uint8.

    A photo at least twice the target is first shrunk by an integer box filter (cheap in
    8 bits, and it keeps fine detail from aliasing), then resized bilinearly by Keras and
    rounded: the result is exactly representable as a PNG, so training can store it.
    """
    pixels = np.asarray(pixels, dtype=np.uint8)
    height, width = size
    if pixels.shape[:2] == (height, width):
        return pixels
    factor = min(pixels.shape[0] // (2 * height), pixels.shape[1] // (2 * width))
    if factor >= 2:
        pixels = np.asarray(Image.fromarray(pixels).reduce(factor))
    import keras  # deferred: importing Keras starts its backend

    out = keras.ops.image.resize(pixels.astype(np.float32), (height, width), interpolation="bilinear")
    return np.clip(np.round(keras.ops.convert_to_numpy(out)), 0, 255).astype(np.uint8)


def resize_image(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Decoded pixels -> the model's float32 (H, W, 3) input (see `prepare_image`)."""
    return prepare_image(pixels, size).astype(np.float32)


def load_image(data: bytes, size: tuple[int, int], **kwargs) -> np.ndarray:
    """Image bytes -> the model's float32 (H, W, 3) input; raises ImageDecodeError."""
    return resize_image(decode_image(data, **kwargs), size)
