"""imgcls.images on the awkward files users send: the pixels training and serving see."""

from __future__ import annotations

import numpy as np
import pytest

from imgcls.images import ImageDecodeError, decode_image, load_image
from tests.service_fixtures import (
    animated_gif,
    bomb_png,
    cmyk_jpeg,
    colour_image,
    encode,
    exif_rotated_jpeg,
    palette_png_with_transparency,
    png16,
)


def test_png_round_trip_is_exact():
    pixels = colour_image("green")
    assert np.array_equal(decode_image(encode(pixels, "PNG")), pixels)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16_bit_png_keeps_the_high_byte_like_tensorflow(channels):
    values = np.random.default_rng(1).integers(0, 65536, (6, 5, channels), dtype=np.uint16)
    expected = (values >> 8).astype(np.uint8)
    expected = np.repeat(expected, 3, axis=2) if channels == 1 else expected[..., :3]
    assert np.array_equal(decode_image(png16(values)), expected)


def test_16_bit_png_matches_tensorflow_decoder():
    tf = pytest.importorskip("tensorflow")
    values = np.random.default_rng(2).integers(0, 65536, (4, 9, 1), dtype=np.uint16)
    data = png16(values)
    ours = decode_image(data)
    theirs = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    assert np.array_equal(ours, theirs)


def test_cmyk_jpeg_becomes_rgb_close_to_the_original():
    pixels = decode_image(cmyk_jpeg("red"))
    assert pixels.shape == (48, 40, 3) and pixels.dtype == np.uint8
    assert pixels[..., 0].mean() > 150 > pixels[..., 2].mean()


def test_palette_with_transparency_keeps_palette_colours():
    pixels = decode_image(palette_png_with_transparency("blue"))
    assert pixels.shape == (48, 40, 3)
    assert pixels[..., 2].mean() > 150 > pixels[..., 0].mean()


def test_animated_gif_gives_its_first_frame():
    pixels = decode_image(animated_gif("red", "blue"))
    assert pixels[..., 0].mean() > 150 > pixels[..., 2].mean()


def test_exif_orientation_is_not_applied():
    stored = colour_image("green", size=(30, 50))
    assert decode_image(exif_rotated_jpeg(stored)).shape == (30, 50, 3)


def test_greyscale_becomes_three_equal_channels():
    grey = np.random.default_rng(3).integers(0, 256, (7, 8), dtype=np.uint8)
    pixels = decode_image(encode(grey, "PNG"))
    assert np.array_equal(pixels, np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty upload"),
        (b"hello, I am a text file", "not an image"),
        (encode(colour_image("red"), "JPEG")[:200], "truncated or corrupt"),
        (encode(colour_image("red"), "PNG")[:120], "truncated or corrupt"),
        (bomb_png(2000, 2000), "over the limit"),
        (bomb_png(30_000, 30_000), "too large"),
    ],
    ids=["empty", "text", "truncated-jpeg", "truncated-png", "over-limit", "pillow-bomb"],
)
def test_unusable_files_raise_image_decode_error(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data, max_pixels=1_000_000)


def test_load_image_resizes_to_float32_model_input():
    x = load_image(encode(colour_image("red"), "PNG"), (32, 32))
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 255
