"""Result files: PNGs decode to exactly the pixels given, the grid spliced from the variants'
rows equals the tiled grid, and webp/jpeg are written on request."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from openedits.imaging.encode import encode_png, encode_results
from openedits.imaging.grid import make_grid
from tests.engines.contract import make_test_image


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im.convert("RGB"))


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (97, 64), (300, 2)])
def test_png_is_lossless(size: tuple[int, int]) -> None:
    for image in (_noise(size, 1), make_test_image(size) if min(size) > 8 else _noise(size, 2)):
        assert np.array_equal(_pixels(encode_png(image)), np.asarray(image))


def _strictly_read(data: bytes) -> bytes:
    """The inflated image data of a PNG, every chunk's CRC and the zlib stream's Adler-32
    checked (decoders differ in what they forgive; zlib forgives nothing)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat = 8, b""
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        idat += body if kind == b"IDAT" else b""
        at += 12 + length
    return zlib.decompress(idat)  # raises on a wrong Adler-32


@pytest.mark.parametrize("size", [(1, 1), (7, 3), (33, 20), (64, 257)])
@pytest.mark.parametrize("smooth", [True, False])
def test_every_file_passes_a_strict_reader(size: tuple[int, int], smooth: bool) -> None:
    # The grid is deflated in bands whose checksums are combined; odd heights give bands of
    # unequal length, and one-row images fewer bands than asked for.
    variants = ([make_test_image(size) if min(size) > 8 else Image.new("RGB", size, (9, 9, 9))]
                * 4 if smooth else [_noise(size, i) for i in range(4)])
    files = encode_results(variants)
    for _, data, _ in [files.grid, *files.singles]:
        _strictly_read(data)
    width, height = size
    raw = _strictly_read(files.grid[1])
    assert len(raw) == 2 * height * (1 + 2 * width * 3)


@pytest.mark.parametrize("first", ["noise", "smooth"])
def test_the_grid_equals_the_tiled_grid(first: str) -> None:
    # Noisy content takes the spliced path (the grid from the variants' deflated rows),
    # smooth content the whole one (deflated twice); both must give the same pixels.
    variants = [_noise((33, 20), i) for i in range(3)] + [make_test_image((33, 20))]
    if first == "smooth":
        variants.reverse()
    files = encode_results(variants)
    assert files.grid[0] == "grid.png" and files.grid[2] == "image/png"
    assert files.grid_size == (66, 40)
    assert np.array_equal(_pixels(files.grid[1]), np.asarray(make_grid(variants)))
    assert [name for name, _, _ in files.singles] == ["0_0.png", "0_1.png", "0_2.png", "0_3.png"]
    for (_, data, _), v in zip(files.singles, variants, strict=True):
        assert np.array_equal(_pixels(data), np.asarray(v))


def test_variants_nobody_links_are_not_encoded() -> None:
    variants = [_noise((16, 16), 5), make_test_image((16, 16))] * 2
    files = encode_results(variants, singles=False)
    assert files.singles == []
    assert files.grid[0] == "grid.png"
    assert np.array_equal(_pixels(files.grid[1]), np.asarray(make_grid(variants)))


@pytest.mark.parametrize(("fmt", "name", "content_type", "pil"),
                         [("webp", "grid.webp", "image/webp", "WEBP"),
                          ("jpeg", "grid.jpg", "image/jpeg", "JPEG")])
def test_webp_and_jpeg_on_request(fmt: str, name: str, content_type: str, pil: str) -> None:
    variants = [make_test_image((64, 48))] * 4
    small = encode_results(variants, fmt=fmt, quality=10)  # type: ignore[arg-type]
    large = encode_results(variants, fmt=fmt, quality=95)  # type: ignore[arg-type]
    assert small.grid[0] == name and small.grid[2] == content_type
    assert small.singles[0][0] == name.replace("grid", "0_0")
    with Image.open(io.BytesIO(small.grid[1])) as im:
        assert im.format == pil and im.size == (128, 96)
    assert len(small.grid[1]) < len(large.grid[1])  # the quality is honoured
