"""decode_image: formats, modes, EXIF, scaling, bombs, and hostile bytes (hypothesis)."""

from __future__ import annotations

import io
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from openedits.errors import ImageInvalid, ImageTooLarge, OpenEditsError
from openedits.imaging.decode import FORMATS, DecodedImage, decode_image
from tests.imaging.conftest import encode, quadrants

LIMITS = {"max_pixels": 40_000_000, "max_side": 2048}
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def decode(data: bytes, **overrides: int) -> DecodedImage:
    return decode_image(data, **{**LIMITS, **overrides})  # type: ignore[arg-type]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but carries almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header is patched to claim width x height."""
    data = bytearray(encode(Image.new("RGB", (16, 16), RED), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_formats_accepted_are_all_known_to_pillow() -> None:
    Image.init()
    assert set(FORMATS) <= set(Image.OPEN)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_each_format(fmt: str) -> None:
    original = quadrants()
    result = decode(encode(original, fmt))
    assert result.format == fmt
    assert result.image.mode == "RGB"
    assert result.image.size == original.size == result.original_size
    assert not result.scaled
    got = np.asarray(result.image).astype(int)
    if fmt in ("JPEG", "WEBP"):  # lossy: judged at the quadrants' centres
        for (x, y), colour in [((16, 12), RED), ((48, 12), GREEN), ((16, 36), BLUE)]:
            assert tuple(got[y, x]) == pytest.approx(colour, abs=40)
    else:
        assert np.array_equal(got, np.asarray(original))


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PCX", "PPM", "SGI"])
def test_other_pillow_formats_are_refused(fmt: str) -> None:
    data = encode(Image.new("RGB", (16, 16), RED), fmt)
    with pytest.raises(ImageInvalid, match="are not a PNG, JPEG, WebP, GIF, BMP or TIFF image"):
        decode(data)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "image_url is empty"),
        (b"<!doctype html><html><body>Sign in</body></html>", "they look like HTML"),
        (b'{"error": "not found"}', "they look like JSON"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "they start with b'%!PS-Ado'"),
        (b"GIF89a", "they start with b'GIF89a'"),
        (encode(quadrants())[:60], "truncated or corrupt"),
        (encode(quadrants(), "JPEG")[:200], "corrupt"),
    ],
)
def test_unusable_bytes_teach(data: bytes, needle: str) -> None:
    with pytest.raises(ImageInvalid) as caught:
        decode(data)
    assert needle in str(caught.value)
    assert str(caught.value).startswith("image_url")


@pytest.mark.parametrize(
    "data",
    [
        png_claiming(50_000, 50_000),  # Pillow itself would raise DecompressionBombError
        png_claiming(10_000, 10_000),  # Pillow would only warn
        png_claiming(7_000, 7_000),  # over our limit, under Pillow's
        jpeg_claiming(65_000, 65_000),
    ],
)
def test_decompression_bombs_refused_fast_from_the_header(data: bytes) -> None:
    started = time.monotonic()
    with pytest.raises(ImageTooLarge) as caught:
        decode(data)
    assert time.monotonic() - started < 0.5
    assert "OPENEDITS_MAX_IMAGE_PIXELS" in str(caught.value)
    assert str(caught.value).startswith("image_url")


def test_bomb_message_gives_the_size() -> None:
    with pytest.raises(ImageTooLarge) as caught:
        decode(png_claiming(7_000, 7_000), max_pixels=1000)
    assert str(caught.value) == (
        "image_url is 7000x7000 = 49000000 pixels, over the limit of 1000 "
        "(OPENEDITS_MAX_IMAGE_PIXELS); send a smaller image"
    )


def test_pixel_limit_is_inclusive() -> None:
    data = encode(Image.new("RGB", (10, 10), RED))
    assert decode(data, max_pixels=100).image.size == (10, 10)
    with pytest.raises(ImageTooLarge):
        decode(data, max_pixels=99)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_applied(fmt: str) -> None:
    original = quadrants((64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    result = decode(encode(original, fmt, exif=exif.tobytes()))
    assert result.image.size == (48, 64)
    assert result.original_size == (48, 64)
    # The top-left (red) quadrant ends up top-right once turned clockwise.
    tolerance = 30 if fmt == "JPEG" else 0
    assert tuple(result.image.getpixel((40, 5))) == pytest.approx(RED, abs=tolerance)  # type: ignore[arg-type]
    assert tuple(result.image.getpixel((5, 5))) == pytest.approx(BLUE, abs=tolerance)  # type: ignore[arg-type]


def test_large_images_scaled_down_and_say_so() -> None:
    result = decode(encode(quadrants((300, 100))), max_side=150)
    assert result.scaled
    assert result.original_size == (300, 100)
    assert result.image.size == (150, 50)
    small = decode(encode(quadrants((150, 50))), max_side=150)
    assert not small.scaled
    assert small.image.size == (150, 50)


def test_large_jpeg_with_orientation_decoded_reduced() -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(quadrants((4000, 1000)), "JPEG", exif=exif.tobytes())
    result = decode(data, max_side=500)
    assert result.original_size == (1000, 4000)
    assert result.image.size == (125, 500)
    assert result.scaled


def _pixel(result: DecodedImage, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    value = result.image.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def test_palette_and_palette_transparency() -> None:
    original = quadrants()
    assert np.array_equal(np.asarray(decode(encode(original.quantize(4))).image), original)
    paletted = Image.new("P", (4, 4), 0)
    paletted.putpalette([255, 0, 0, 0, 0, 255])
    paletted.putpixel((1, 1), 1)
    result = decode(encode(paletted, "PNG", transparency=0))
    assert _pixel(result) == WHITE
    assert _pixel(result, (1, 1)) == BLUE
    gif = decode(encode(paletted, "GIF", transparency=0))
    assert _pixel(gif) == WHITE


def test_grey_bilevel_and_grey_alpha() -> None:
    assert _pixel(decode(encode(Image.new("L", (4, 4), 100)))) == (100, 100, 100)
    assert _pixel(decode(encode(Image.new("1", (4, 4), 1)))) == WHITE
    assert _pixel(decode(encode(Image.new("LA", (4, 4), (0, 0))))) == WHITE
    assert _pixel(decode(encode(Image.new("LA", (4, 4), (0, 255))))) == (0, 0, 0)


def test_alpha_composited_on_white() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    result = decode(encode(rgba))
    assert _pixel(result, (0, 0)) == WHITE
    assert _pixel(result, (1, 0)) == BLUE
    assert _pixel(result, (2, 0)) == pytest.approx((127, 127, 127), abs=1)
    webp = decode(encode(rgba, "WEBP", lossless=True))
    assert _pixel(webp, (0, 0)) == WHITE


def test_rgb_with_transparent_colour() -> None:
    result = decode(encode(quadrants(), "PNG", transparency=RED))
    assert _pixel(result) == WHITE
    assert _pixel(result, (40, 5)) == GREEN


def test_cmyk() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    assert _pixel(decode(encode(cmyk, "TIFF"))) == RED
    assert _pixel(decode(encode(cmyk, "JPEG"))) == pytest.approx(RED, abs=8)


def test_sixteen_bit_grey_and_rgb_scaled_not_clipped() -> None:
    grey = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    result = decode(encode(grey))
    assert [_pixel(result, (x, 0))[0] for x in range(3)] == [0, 128, 255]
    bgr = np.zeros((2, 2, 3), dtype=np.uint16)
    bgr[0, 0] = (0, 0, 65535)  # red, in OpenCV's BGR order
    bgr[1, 1] = (32896, 32896, 32896)
    ok, png16 = cv2.imencode(".png", bgr)
    assert ok
    result = decode(png16.tobytes())
    assert _pixel(result, (0, 0)) == RED
    assert _pixel(result, (1, 1)) == (128, 128, 128)


def test_deep_tiffs() -> None:
    ints = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    result = decode(encode(ints, "TIFF"))
    assert [_pixel(result, (x, 0))[0] for x in range(2)] == [0, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    result = decode(encode(floats, "TIFF"))
    assert [_pixel(result, (x, 0))[0] for x in range(3)] == [0, 128, 255]


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, **extra)
    result = decode(buf.getvalue())
    assert _pixel(result) == RED
    assert result.image.mode == "RGB"


# --- hypothesis: whatever the bytes, only openedits errors come out

_MODES_FORMATS = [
    ("RGB", "PNG"),
    ("RGBA", "PNG"),
    ("L", "PNG"),
    ("LA", "PNG"),
    ("P", "PNG"),
    ("1", "PNG"),
    ("I;16", "PNG"),
    ("RGB", "JPEG"),
    ("L", "JPEG"),
    ("CMYK", "JPEG"),
    ("RGB", "WEBP"),
    ("RGBA", "WEBP"),
    ("P", "GIF"),
    ("L", "GIF"),
    ("RGB", "BMP"),
    ("1", "BMP"),
    ("RGB", "TIFF"),
    ("CMYK", "TIFF"),
    ("RGBA", "TIFF"),
    ("I;16", "TIFF"),
    ("F", "TIFF"),
]


@st.composite
def valid_images(draw: st.DrawFn) -> tuple[bytes, tuple[int, int]]:
    mode, fmt = draw(st.sampled_from(_MODES_FORMATS))
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    seed = draw(st.integers(0, 2**32 - 1))
    noise = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    image = image.convert("I").convert("I;16") if mode == "I;16" else image.convert(mode)
    return encode(image, fmt), size


@st.composite
def mangled_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_images())[0])
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def _decode_or_openedits_error(data: bytes, max_side: int = 64) -> DecodedImage | None:
    try:
        result = decode_image(data, max_pixels=100_000, max_side=max_side)
    except OpenEditsError:
        return None
    assert result.image.mode == "RGB"
    assert max(result.image.size) <= max_side
    return result


_HYPOTHESIS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_HYPOTHESIS
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_only_raise_openedits_errors(data: bytes) -> None:
    _decode_or_openedits_error(data)


@_HYPOTHESIS
@given(
    st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF", b"BM", b"II*\0"]),
    st.binary(max_size=2048),
)
def test_arbitrary_bytes_behind_a_magic_number(magic: bytes, rest: bytes) -> None:
    _decode_or_openedits_error(magic + rest)


@_HYPOTHESIS
@given(mangled_images())
def test_mangled_images_only_raise_openedits_errors(data: bytes) -> None:
    _decode_or_openedits_error(data)


@_HYPOTHESIS
@given(valid_images(), st.integers(8, 64))
def test_valid_images_always_decode_to_rgb_of_the_right_size(
    case: tuple[bytes, tuple[int, int]], max_side: int
) -> None:
    data, (width, height) = case
    result = _decode_or_openedits_error(data, max_side)
    assert result is not None
    assert result.original_size == (width, height)
    assert result.scaled == (max(width, height) > max_side)
    if result.scaled:
        factor = max_side / max(width, height)
        assert result.image.size == (max(1, round(width * factor)), max(1, round(height * factor)))
    else:
        assert result.image.size == (width, height)
