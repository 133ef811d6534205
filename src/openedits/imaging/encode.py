"""Result files: the four variants and their 2x2 grid encoded as PNG (lossless), WebP or JPEG.

PNG is the largest fixed cost of an edit after the engine, so it is written here rather than
by Pillow: every row is filtered with PNG's "Up" filter in one numpy operation (Pillow tries
five filters per row) and deflated at level 1. Each variant row is deflated on its own (a full
flush: no reference outside the row), so the grid, whose rows are two variant rows side by
side, is spliced from the variants' compressed rows instead of being encoded a second time.
The files are ordinary PNGs that decode to exactly the pixels given.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

__all__ = ["FORMATS", "EncodedResults", "OutputFormat", "encode_png", "encode_results"]

OutputFormat = Literal["png", "webp", "jpeg"]
FORMATS: dict[str, tuple[str, str]] = {
    "png": (".png", "image/png"),
    "webp": (".webp", "image/webp"),
    "jpeg": (".jpg", "image/jpeg"),
}
_DEFAULT_QUALITY = {"webp": 90, "jpeg": 90}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NONE, _UP = 0, 2
# zlib's default memory level: smaller ones made photo rows slower and larger (measured with
# bench/edit_latency.py's encoder table), though a full flush after every row clears the table.
_MEM_LEVEL = 8


@dataclass(frozen=True)
class EncodedResults:
    """The files of one edit: (name, bytes, content type) for the grid and each variant."""

    grid: tuple[str, bytes, str]
    singles: list[tuple[str, bytes, str]]
    grid_size: tuple[int, int]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(data, zlib.crc32(kind))
    )


def _png(width: int, height: int, deflated: bytes, adler: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    stream = b"\x78\x01" + deflated + struct.pack(">I", adler)
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(
        b"IEND", b""
    )


def _raw_deflate(data: bytes) -> bytes:
    """`data` as a raw deflate fragment that ends on a full flush: it can be placed anywhere
    in a stream, after any other such fragment."""
    c = zlib.compressobj(1, zlib.DEFLATED, -15, _MEM_LEVEL)
    return c.compress(data) + c.flush(zlib.Z_FULL_FLUSH)


# Filter-type bytes, deflated once: the row segments below carry pixels only.
_FILTER_BYTE = {f: _raw_deflate(bytes([f])) for f in (_NONE, _UP)}


@dataclass(frozen=True)
class _Rows:
    """One image's rows, Up-filtered (row 0 unfiltered) and each deflated on its own."""

    filtered: np.ndarray  # height x (width * 3), the bytes after the filter-type byte
    segments: list[bytes]


def _rows(rgb: np.ndarray) -> _Rows:
    height = rgb.shape[0]
    flat = rgb.reshape(height, -1)
    filtered = np.empty_like(flat)
    filtered[0] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=filtered[1:])  # uint8: wraps modulo 256, as PNG's Up
    c = zlib.compressobj(1, zlib.DEFLATED, -15, _MEM_LEVEL)
    segments = []
    full = zlib.Z_FULL_FLUSH
    for row in filtered:
        segments.append(c.compress(row.data) + c.flush(full))
    return _Rows(filtered, segments)


def _assemble(width: int, height: int, row_lists: Sequence[Sequence[_Rows]]) -> bytes:
    """A PNG whose row y is the rows y of the images of one band side by side, band after
    band (each band one list of same-height images)."""
    parts: list[bytes] = []
    adler = 1
    for band in row_lists:
        rows = band[0].filtered.shape[0]
        filtered = np.hstack([r.filtered for r in band])
        body = np.empty((rows, filtered.shape[1] + 1), np.uint8)
        body[:, 0] = _UP
        body[0, 0] = _NONE  # the band's first row is unfiltered, whatever lies above it
        body[:, 1:] = filtered
        adler = zlib.adler32(body.data, adler)
        for y in range(rows):
            parts.append(_FILTER_BYTE[_NONE if y == 0 else _UP])
            parts.extend(r.segments[y] for r in band)
    # An empty final block closes the stream.
    parts.append(b"\x03\x00")
    return _png(width, height, b"".join(parts), adler)


def encode_png(image: Image.Image) -> bytes:
    """A lossless RGB PNG of `image`."""
    rgb = np.asarray(image.convert("RGB"))
    return _assemble(rgb.shape[1], rgb.shape[0], [[_rows(rgb)]])


def _pillow(image: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "webp":
        image.save(buf, format="WEBP", quality=quality, method=2)
    else:
        image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_results(
    variants: Sequence[Image.Image],
    *,
    fmt: OutputFormat = "png",
    quality: int | None = None,
    singles: bool = True,
    pool: Executor | None = None,
) -> EncodedResults:
    """Encode the 2x2 grid of four same-size RGB `variants` (reading order) and, when
    `singles`, each variant as `0_<i>`. `quality` (1-100) applies to webp and jpeg."""
    if len(variants) != 4:
        raise ValueError(f"a grid needs exactly 4 images, got {len(variants)}")
    if len({v.size for v in variants}) != 1:
        raise ValueError(f"grid images must share one size, got {[v.size for v in variants]}")
    ext, content_type = FORMATS[fmt]
    width, height = variants[0].size
    grid_size = (2 * width, 2 * height)
    mapper = pool.map if pool is not None else map

    if fmt == "png":
        arrays = [np.asarray(v.convert("RGB")) for v in variants]
        rows = list(mapper(_rows, arrays))
        grid = _assemble(grid_size[0], grid_size[1], [rows[:2], rows[2:]])
        files = (
            list(mapper(lambda r: _assemble(width, height, [[r]]), rows)) if singles else []
        )
    else:
        q = quality or _DEFAULT_QUALITY[fmt]
        from openedits.imaging.grid import make_grid

        grid_image = make_grid(variants)
        images = [grid_image, *variants] if singles else [grid_image]
        encoded = list(mapper(lambda im: _pillow(im, fmt, q), images))
        grid, files = encoded[0], encoded[1:]
    return EncodedResults(
        grid=(f"grid{ext}", grid, content_type),
        singles=[(f"0_{i}{ext}", data, content_type) for i, data in enumerate(files)],
        grid_size=grid_size,
    )
