"""Result files: the four variants and their 2x2 grid encoded as PNG (lossless), WebP or JPEG.

PNG is the largest fixed cost of an edit after the engine, so it is written here rather than
by Pillow: every row is filtered with PNG's "Up" filter in one numpy operation (Pillow tries
five filters per row) and deflated at level 1. Each variant row is deflated on its own (a full
flush: no reference outside the row), so the grid, whose rows are two variant rows side by
side, is spliced from the variants' compressed rows instead of being encoded a second time.
When rows deflate almost for free (smooth content) the grid is deflated whole instead, in
bands side by side. The files are ordinary PNGs that decode to exactly the pixels given.
"""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

__all__ = ["FORMATS", "EncodedResults", "OutputFormat", "encode_png", "encode_results"]

OutputFormat = Literal["png", "webp", "jpeg"]
Mapper = Callable[..., Iterable[Any]]  # map, or an executor's map
FORMATS: dict[str, tuple[str, str]] = {
    "png": (".png", "image/png"),
    "webp": (".webp", "image/webp"),
    "jpeg": (".jpg", "image/jpeg"),
}
_DEFAULT_QUALITY = {"webp": 90, "jpeg": 90}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NONE, _UP = 0, 2
# memLevel 5: a full flush after every row clears the hash table, so a smaller one than zlib's
# default (8) costs less per row; below 5, photo rows came out larger and slower (measured).
_MEM_LEVEL = 5


@dataclass(frozen=True)
class EncodedResults:
    """The files of one edit: (name, bytes, content type) for the grid and each variant."""

    grid: tuple[str, bytes, str]
    singles: list[tuple[str, bytes, str]]
    grid_size: tuple[int, int]


def _chunk(kind: bytes, *parts: bytes) -> list[bytes]:
    crc = zlib.crc32(kind)
    for part in parts:
        crc = zlib.crc32(part, crc)
    return [struct.pack(">I", sum(map(len, parts))), kind, *parts, struct.pack(">I", crc)]


def _png(width: int, height: int, deflated: bytes, adler: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = _chunk(b"IDAT", b"\x78\x01", deflated, struct.pack(">I", adler))
    return b"".join(
        [_PNG_SIGNATURE, *_chunk(b"IHDR", header), *idat, *_chunk(b"IEND")]
    )


def _raw_deflate(data: bytes) -> bytes:
    """`data` as a raw deflate fragment that ends on a full flush: it can be placed anywhere
    in a stream, after any other such fragment."""
    c = zlib.compressobj(1, zlib.DEFLATED, -15, _MEM_LEVEL)
    return c.compress(data) + c.flush(zlib.Z_FULL_FLUSH)


# Filter-type bytes, deflated once: the row segments below carry pixels only.
_FILTER_BYTE = {f: _raw_deflate(bytes([f])) for f in (_NONE, _UP)}


def _band_lines(side: Sequence[np.ndarray], a: int, b: int) -> np.ndarray:
    """The PNG scanlines of rows a..b of the same-height images `side` placed side by side
    (one image: its own scanlines): the filter-type byte, then each row Up-filtered against
    the row above, the images' first row unfiltered."""
    span = side[0].shape[1] * 3
    lines = np.empty((b - a, 1 + span * len(side)), np.uint8)
    lines[:, 0] = _UP
    top = int(a == 0)
    if top:
        lines[0, 0] = _NONE
    for i, rgb in enumerate(side):
        flat = rgb.reshape(rgb.shape[0], -1)
        out = lines[:, 1 + i * span : 1 + (i + 1) * span]
        if top:
            out[0] = flat[0]
        # uint8 wraps modulo 256, as PNG's Up filter does
        np.subtract(flat[a + top : b], flat[a + top - 1 : b - 1], out=out[top:])
    return lines


def _deflate(data: memoryview) -> bytes:
    """A raw deflate fragment of `data` that ends on a full flush (placeable anywhere)."""
    c = zlib.compressobj(1, zlib.DEFLATED, -15, 8)
    return c.compress(data) + c.flush(zlib.Z_FULL_FLUSH)


_ADLER_BASE = 65521


def _adler_combine(first: int, second: int, second_length: int) -> int:
    """The Adler-32 of two byte strings one after the other, from each one's own (zlib's
    adler32_combine, which Python's zlib does not expose): A = A1 + A2 - 1 and
    B = B1 + B2 + len2 * (A1 - 1), both modulo 65521."""
    a1, b1 = first & 0xFFFF, first >> 16
    a2, b2 = second & 0xFFFF, second >> 16
    a = (a1 + a2 - 1) % _ADLER_BASE
    b = (b1 + b2 + second_length * (a1 - 1)) % _ADLER_BASE
    return a | (b << 16)


# A PNG deflated whole: stacks of same-height images, top to bottom, each stack's images side
# by side (the grid is two stacks of two; a single image, one stack of one), each stack cut
# into that many bands.
_Stacks = Sequence[tuple[Sequence[np.ndarray], int]]


def _deflated_band(band: tuple[Sequence[np.ndarray], int, int]) -> tuple[bytes, int, int]:
    """One band's scanlines made, deflated and checksummed, all on one thread: (deflated,
    Adler-32, length)."""
    lines = _band_lines(*band)
    data = lines.reshape(-1).data
    return _deflate(data), zlib.adler32(data), data.nbytes


def _whole(files: Sequence[_Stacks], mapper: Mapper) -> list[bytes]:
    """PNGs of `files`, every band of all of them filtered, deflated and checksummed in one
    pass on `mapper`: the threads never wait for one file to finish before the next one's
    bands start, and the caller's thread does no per-byte work."""
    bands: list[tuple[Sequence[np.ndarray], int, int]] = []
    spans: list[tuple[int, int]] = []
    for stacks in files:
        first = len(bands)
        for side, parts in stacks:
            height = side[0].shape[0]
            cuts = [height * i // parts for i in range(parts + 1)]
            bands += [(side, a, b) for a, b in itertools.pairwise(cuts) if b > a]
        spans.append((first, len(bands)))
    done = list(mapper(_deflated_band, bands))
    out = []
    for stacks, (a, b) in zip(files, spans, strict=True):
        adler = 1
        for _, band_adler, length in done[a:b]:
            adler = _adler_combine(adler, band_adler, length)
        data = b"".join(d for d, _, _ in done[a:b]) + b"\x03\x00"  # an empty final block
        width = sum(image.shape[1] for image in stacks[0][0])
        height = sum(side[0].shape[0] for side, _ in stacks)
        out.append(_png(width, height, data, adler))
    return out


@dataclass(frozen=True)
class _Rows:
    """One image's scanlines, each row's pixels deflated on its own (for splicing)."""

    lines: np.ndarray
    segments: list[bytes]


def _rows(rgb: np.ndarray) -> _Rows:
    lines = _band_lines((rgb,), 0, rgb.shape[0])
    # Huffman codes only: in filtered photo rows LZ77 finds little to match, so looking for
    # matches cost about twice the time and gave larger files (measured).
    c = zlib.compressobj(1, zlib.DEFLATED, -15, _MEM_LEVEL, zlib.Z_HUFFMAN_ONLY)
    full = zlib.Z_FULL_FLUSH
    # Slicing one memoryview is far cheaper per row than slicing the array.
    view, step = lines.reshape(-1).data, lines.shape[1]
    segments = [
        c.compress(view[y * step + 1 : (y + 1) * step]) + c.flush(full)
        for y in range(lines.shape[0])
    ]
    return _Rows(lines, segments)


def _spliced(width: int, height: int, bands: Sequence[Sequence[_Rows]]) -> bytes:
    """A PNG whose row y is the rows y of the images of one band side by side, band after
    band (each band one list of same-height images), from their deflated rows."""
    parts: list[bytes] = []
    adler = 1
    for band in bands:
        first, rest = band[0], band[1:]
        step = first.lines.shape[1]
        if not rest:
            adler = zlib.adler32(first.lines.data, adler)
        else:
            # The grid's rows: the first image's line (with its filter byte), then the others'
            # pixels; the checksum is taken over them in place, without a copy.
            views = [r.lines.reshape(-1).data for r in band]
            for y in range(first.lines.shape[0]):
                at = y * step
                adler = zlib.adler32(views[0][at : at + step], adler)
                for v in views[1:]:
                    adler = zlib.adler32(v[at + 1 : at + step], adler)
        for y, kind in enumerate(first.lines[:, 0].tolist()):
            parts.append(_FILTER_BYTE[kind])
            parts.extend(r.segments[y] for r in band)
    parts.append(b"\x03\x00")  # an empty final block closes the stream
    return _png(width, height, b"".join(parts), adler)


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """A lossless RGB PNG of `image` (or of an height x width x 3 uint8 array)."""
    return _whole([[((_rgb(image),), 1)]], map)[0]


def _png_files(
    arrays: list[np.ndarray], singles: bool, mapper: Mapper
) -> tuple[bytes, list[bytes]]:
    """The grid and (when `singles`) the variants as PNG, the cheapest way for the content.

    Deflating a row on its own costs a block (a few microseconds of Huffman tables) per row,
    which pays off only when rows are expensive to deflate (photos): then the grid is spliced
    from the variants' rows instead of deflated a second time. Content that deflates almost
    for free (flat or smooth: most filtered bytes zero) is deflated whole, twice.
    """
    height, width = arrays[0].shape[:2]
    if singles:
        sample = arrays[0][:: max(1, height // 64)]
        smooth = np.count_nonzero(np.diff(sample, axis=0)) < 0.5 * sample[1:].size
        if not smooth:
            rows = list(mapper(_rows, arrays))
            grid = _spliced(2 * width, 2 * height, [rows[:2], rows[2:]])
            return grid, list(mapper(lambda r: _spliced(width, height, [[r]]), rows))
        grid, *files = _whole([_grid(arrays), *([((a,), 1)] for a in arrays)], mapper)
        return grid, files
    return _whole([_grid(arrays)], mapper)[0], []


def _grid(arrays: Sequence[np.ndarray]) -> _Stacks:
    """The 2x2 grid as two stacks of two, each cut in two bands (four bands side by side)."""
    return [((arrays[0], arrays[1]), 2), ((arrays[2], arrays[3]), 2)]


def _pillow(image: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "webp":
        image.save(buf, format="WEBP", quality=quality, method=2)
    else:
        image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_results(
    variants: Sequence[Image.Image | np.ndarray],
    *,
    fmt: OutputFormat = "png",
    quality: int | None = None,
    singles: bool = True,
    pool: Executor | None = None,
) -> EncodedResults:
    """Encode the 2x2 grid of four same-size RGB `variants` (reading order; images or
    height x width x 3 uint8 arrays) and, when `singles`, each variant as `0_<i>`. `quality`
    (1-100) applies to webp and jpeg."""
    if len(variants) != 4:
        raise ValueError(f"a grid needs exactly 4 images, got {len(variants)}")
    arrays = [_rgb(v) for v in variants]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"grid images must share one size, got {[a.shape for a in arrays]}")
    ext, content_type = FORMATS[fmt]
    height, width = arrays[0].shape[:2]
    mapper = pool.map if pool is not None else map

    if fmt == "png":
        grid, files = _png_files(arrays, singles, mapper)
    else:
        q = quality or _DEFAULT_QUALITY[fmt]
        from openedits.imaging.grid import make_grid

        images = [Image.fromarray(a, "RGB") for a in arrays]
        grid_image = make_grid(images)
        todo = [grid_image, *images] if singles else [grid_image]
        encoded = list(mapper(lambda im: _pillow(im, fmt, q), todo))
        grid, files = encoded[0], encoded[1:]
    return EncodedResults(
        grid=(f"grid{ext}", grid, content_type),
        singles=[(f"0_{i}{ext}", data, content_type) for i, data in enumerate(files)],
        grid_size=(2 * width, 2 * height),
    )
