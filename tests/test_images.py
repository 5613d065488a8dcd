"""imgcls.images on the awkward files users send: the pixels training and serving see."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from imgcls.images import (
    ACCEPTED_FORMATS,
    ImageDecodeError,
    UnsupportedFormatError,
    accepted_extensions,
    decode_cost,
    decode_image,
    decode_preview,
    load_image,
    model_input,
    prepare_image,
)
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


def _exif_png(pixels: np.ndarray, orientation: int) -> bytes:
    from PIL import Image as PILImage

    exif = PILImage.Exif()
    exif[0x0112] = orientation
    return encode(pixels, "PNG", exif=exif.tobytes())


def test_exif_orientation_is_applied_so_the_photo_is_upright():
    stored = colour_image("green", size=(30, 50))
    assert decode_image(exif_rotated_jpeg(stored)).shape == (50, 30, 3)  # 6: a quarter turn


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_as_pillow_exif_transpose(orientation):
    """Every orientation, full size and shrunk for a model: the pixels Pillow's
    ImageOps.exif_transpose gives, and the model input of the same photo stored upright
    (sizes whose whole-factor reduction leaves no partial block: otherwise the partial
    row lands on another edge once turned, and the two differ there by rounding)."""
    import io

    from PIL import Image as PILImage
    from PIL import ImageOps

    stored = np.random.default_rng(orientation).integers(0, 256, (216, 144, 3), dtype=np.uint8)
    data = _exif_png(stored, orientation)
    upright = np.asarray(ImageOps.exif_transpose(PILImage.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(decode_image(data), upright)
    for size in [(16, 16), (12, 20)]:
        expected = model_input(encode(upright, "PNG"), size)
        assert np.array_equal(model_input(data, size), expected), size


def test_exif_turn_keeps_jpeg_draft_decoding_and_the_cost_bound():
    big = colour_image("red", size=(1200, 800))
    plain, turned = encode(big, "JPEG", quality=95), exif_rotated_jpeg(big)
    assert (
        decode_image(turned, target=(64, 64)).shape[:2] == decode_image(plain, target=(64, 64)).shape[1::-1]
    )
    assert decode_image(turned, target=(64, 64)).shape[0] < 1200 / 2  # still decoded at a reduced scale
    assert decode_cost(plain, (64, 64)) < decode_cost(turned, (64, 64)) < 2 * decode_cost(plain, (64, 64))
    assert decode_cost(turned) >= 2 * 4 * 1200 * 800  # full size: the decoded image and its turn


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


# --- bounded memory: the shrink happens in 8 bits, before RGB, whatever the shape --------


def test_large_jpeg_is_decoded_in_draft_mode_near_the_model_size():
    photo = np.random.default_rng(4).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    data = encode(photo, "JPEG", quality=90)
    drafted = decode_image(data, target=(100, 100))
    assert drafted.shape == (150, 200, 3)  # DCT scale 1/8: at least the target, no more
    assert decode_image(data).shape == (1200, 1600, 3)  # full pixels without a target
    assert np.array_equal(model_input(data, (100, 100)), prepare_image(drafted, (100, 100)))


def test_long_thin_image_is_shrunk_per_axis_before_rgb():
    thin = np.zeros((40, 4000), np.uint8)
    thin[:, ::3] = 255
    decoded = decode_image(encode(thin, "PNG"), target=(32, 32))
    assert decoded.shape == (40, 98, 3)  # width reduced by 41 (4000 // 96), height left as it is
    assert model_input(encode(thin, "PNG"), (32, 32)).shape == (32, 32, 3)


def test_shrunk_and_full_pixels_give_the_same_model_input():
    """Without JPEG draft, the decode-time shrink changes nothing the resize would not do."""
    pixels = np.random.default_rng(6).integers(0, 256, (700, 301, 3), dtype=np.uint8)
    data = encode(pixels, "PNG")
    for size in [(32, 32), (64, 20), (224, 224)]:
        assert np.array_equal(model_input(data, size), prepare_image(decode_image(data), size))


def test_16_bit_image_is_narrowed_exactly_across_strips():
    """1200 rows of 2000 are narrowed in three strips (imgcls.images._STRIP_PIXELS)."""
    values = np.random.default_rng(7).integers(0, 65536, (1200, 2000), dtype=np.uint16)
    data = png16(values[..., None])
    assert np.array_equal(decode_image(data)[..., 0], (values >> 8).astype(np.uint8))


def test_preview_for_overlays_is_bounded():
    big = np.random.default_rng(8).integers(0, 256, (3000, 1000, 3), dtype=np.uint8)
    assert decode_preview(encode(big, "PNG"), max_side=1024).shape == (1024, 341, 3)
    assert decode_preview(encode(colour_image("red"), "PNG")).shape == (48, 40, 3)


def test_the_image_path_imports_no_ml_framework():
    """An HTTP front decodes and resizes: neither may load Keras, TensorFlow or JAX."""
    code = (
        "import sys, numpy as np, service.service\n"
        "from imgcls.images import model_input, prepare_image\n"
        "from tests.service_fixtures import colour_image, encode\n"
        "model_input(encode(colour_image('red'), 'PNG'), (32, 32))\n"
        "prepare_image(np.zeros((100, 9, 3), np.uint8), (224, 224))\n"
        "print(sorted(m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- formats: one allow-list, anything else refused by name -----------------------------


@pytest.mark.parametrize("fmt", ["ICO", "DDS", "EPS", "PCX"])
def test_formats_outside_the_allow_list_are_refused_by_name(fmt):
    data = encode(colour_image("red", size=(32, 32)), fmt)
    with pytest.raises(UnsupportedFormatError, match=f"image format {fmt} is not accepted.*PNG"):
        decode_image(data)
    assert fmt not in ACCEPTED_FORMATS


def test_accepted_formats_and_file_endings_are_one_list():
    assert ACCEPTED_FORMATS == ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
    assert {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"} <= set(accepted_extensions())
    assert not {".ico", ".dds", ".eps", ".pdf", ".psd"} & set(accepted_extensions())


def _corpus() -> dict[str, bytes]:
    """A valid file of every accepted format (and variants), plus refused formats."""
    pixels = colour_image("green", size=(24, 20), seed=3)
    return {
        "png": encode(pixels, "PNG"),
        "png-palette": palette_png_with_transparency("red"),
        "png-16": png16(np.random.default_rng(1).integers(0, 65536, (9, 7, 1), dtype=np.uint16)),
        "jpeg": encode(pixels, "JPEG", quality=90),
        "jpeg-progressive": encode(pixels, "JPEG", progressive=True),
        "jpeg-cmyk": cmyk_jpeg("blue"),
        "gif": animated_gif("red", "blue"),
        "bmp": encode(pixels, "BMP"),
        "tiff": encode(pixels, "TIFF"),
        "tiff-lzw": encode(pixels, "TIFF", compression="tiff_lzw"),
        "webp": encode(pixels, "WEBP", quality=80),
        "webp-lossless": encode(pixels, "WEBP", lossless=True),
        "ico": encode(pixels, "ICO"),
        "dds": encode(pixels, "DDS"),
    }


def _mutations(data: bytes, rng: random.Random):
    """Bit flips, header byte overwrites, truncations and cut-outs of one valid file."""
    for _ in range(40):
        out = bytearray(data)
        kind = rng.randrange(4)
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            for _ in range(rng.randint(1, 4)):
                out[rng.randrange(min(64, len(out)))] = rng.choice(
                    [0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)]
                )
        elif kind == 2:
            del out[rng.randrange(1, len(out)) :]
        else:
            start = rng.randrange(len(out))
            del out[start : start + rng.randint(1, 16)]
        yield bytes(out)


@pytest.mark.timing  # as many cases as 20 s allow, at least 2000
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on corrupt TIFF/EXIF tags
def test_fuzzed_files_raise_only_image_decode_error():
    """A seeded mutation loop over every format: a 4xx reason or a valid image, nothing else."""
    rng, cases, deadline = random.Random(9), 0, time.monotonic() + 20
    for name, data in _corpus().items():
        for round_ in range(8):
            for mutated in _mutations(data, rng):
                target = (16, 16) if round_ % 2 else None
                try:
                    pixels = decode_image(mutated, max_pixels=1_000_000, target=target)
                except ImageDecodeError:
                    pass
                else:
                    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3, name
                cases += 1
            if time.monotonic() > deadline:
                break
    assert cases >= 2000
