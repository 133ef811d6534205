"""Image decoding under limits: type sniffed, pixels checked before decoding, EXIF, modes to RGB."""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from openedits.errors import ImageInvalid, ImageTooLarge, OpenEditsError

__all__ = [
    "ALPHA_MODES",
    "DEEP_MODES",
    "FORMATS",
    "DecodedImage",
    "LoadedImage",
    "decode_image",
    "deep_to_l",
    "load_checked",
    "pillow_guard",
    "to_rgb",
]

FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""Pillow formats accepted from clients. Others Pillow knows (EPS runs Ghostscript, PSD, ICO, ...)
are refused: each is more attack surface and none is a plausible photo or mask upload. (A phone's
multi-picture JPEG opens through "JPEG" and reports itself as "MPO".)"""

_FORMAT_NAMES = "a PNG, JPEG, WebP, GIF, BMP or TIFF image"
DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

# warnings.catch_warnings swaps the process-wide filter list, so two threads inside it at once
# could leave each other's filters behind; decoding is serialised through this lock instead.
_PILLOW_LOCK = threading.Lock()


@contextmanager
def pillow_guard() -> Iterator[None]:
    """Run Pillow on client bytes with its warnings silenced and one decode at a time.

    Pillow warns about odd files (corrupt EXIF, decompression bombs, ...). Our own checks decide
    what is refused, so those warnings must neither reach logs as noise nor, under `-W error`,
    turn into exceptions that are not openedits errors.
    """
    with _PILLOW_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass(frozen=True)
class DecodedImage:
    """A client image ready for an engine, and what was done to get it there."""

    image: Image.Image  # mode RGB, EXIF orientation applied, at most max_side on its long side
    original_size: tuple[int, int]  # after EXIF orientation, before scaling down
    scaled: bool
    format: str  # "PNG", "JPEG", "WEBP", ...


@dataclass(frozen=True)
class LoadedImage:
    """Pixels loaded from client bytes, EXIF orientation applied, in the file's own mode."""

    image: Image.Image
    original_size: tuple[int, int]  # after EXIF orientation, before any draft reduction
    format: str


def _describe_bytes(data: bytes) -> str:
    head = data[:16].lstrip()
    if head[:1] == b"<":
        return "they look like HTML or XML text"
    if head[:1] in (b"{", b"["):
        return "they look like JSON"
    return f"they start with {data[:8]!r}"


def load_checked(
    data: bytes,
    *,
    field: str,
    max_pixels: int,
    kind: str = "image",
    fit_side: int | None = None,
) -> LoadedImage:
    """Open client bytes, refuse them before decoding if over `max_pixels`, then load them.

    The format is sniffed from the bytes (any declared content-type is ignored). When
    `fit_side` is given, a JPEG is decoded at a reduced scale that still covers it. Call inside
    `pillow_guard()`. Raises ImageInvalid or ImageTooLarge naming `field`.
    """
    if not data:
        raise ImageInvalid(f"{field} is empty: no bytes were received; send {_FORMAT_NAMES}")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise ImageTooLarge(
            f"{field} declares a pixel count over Pillow's safety limit, far over the limit of "
            f"{max_pixels} pixels (OPENEDITS_MAX_IMAGE_PIXELS); send a smaller {kind}"
        ) from None
    except UnidentifiedImageError:
        raise ImageInvalid(
            f"{field}: the bytes received ({len(data)}) are not {_FORMAT_NAMES} "
            f"({_describe_bytes(data)}); send one of those"
        ) from None
    except Exception as exc:  # Pillow raises many types on hostile headers; all mean "corrupt"
        raise ImageInvalid(
            f"{field}: the {kind} header is corrupt ({_short(exc)}); send {_FORMAT_NAMES}"
        ) from None
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageInvalid(f"{field}: the {kind} is {width}x{height} pixels, which is empty")
    if width * height > max_pixels:
        # Decided from the header alone: the pixels of a decompression bomb are never allocated.
        raise ImageTooLarge(
            f"{field} is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (OPENEDITS_MAX_IMAGE_PIXELS); send a smaller {kind}"
        )
    try:
        if fit_side is not None and im.format in ("JPEG", "MPO") and max(im.size) > fit_side:
            # Decode straight to 1/2, 1/4 or 1/8 scale (still >= the target): far less memory
            # and time for a large photo that is going to be scaled down anyway.
            scale = fit_side / max(width, height)
            im.draft(None, (max(1, int(width * scale) + 1), max(1, int(height * scale) + 1)))
        im.load()
        loaded_size = im.size
        fmt = im.format or "UNKNOWN"
    except OpenEditsError:
        raise
    except Exception as exc:  # truncated or corrupt data, in any of Pillow's many ways
        raise ImageInvalid(
            f"{field}: the {kind} could not be decoded ({_short(exc)}); the file is truncated "
            f"or corrupt, so send it again or re-save it as PNG or JPEG"
        ) from None
    oriented = _apply_orientation(im)
    swapped = oriented.size != loaded_size
    return LoadedImage(
        image=oriented,
        original_size=(height, width) if swapped else (width, height),
        format=fmt,
    )


def _apply_orientation(im: Image.Image) -> Image.Image:
    """The image as the camera meant it to be seen (EXIF orientation), when that can be read."""
    try:
        # In place: without a rotation to apply, exif_transpose would otherwise copy the pixels.
        ImageOps.exif_transpose(im, in_place=True)
        return im
    except Exception:  # a broken EXIF block is ignored: the pixels themselves are fine
        return im


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 100 else text[:97] + "..."


def deep_to_l(im: Image.Image) -> Image.Image:
    """8-bit grey from a 16/32-bit integer or float image, scaled rather than clipped."""
    values = np.asarray(im).astype(np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    peak = float(values.max()) if values.size else 0.0
    if im.mode.startswith("I;16") or (im.mode == "I" and peak > 255):
        values = values / 257.0  # 16-bit range onto 8-bit: 65535 -> 255
    elif im.mode == "F" and peak <= 1.0:
        values = values * 255.0  # float images are usually 0..1
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any mode: palette, grey, deep, CMYK; alpha is composited on white."""
    if im.mode in DEEP_MODES:
        im = deep_to_l(im)
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(
    data: bytes, *, field: str = "image_url", max_pixels: int, max_side: int
) -> DecodedImage:
    """Decode client bytes into an RGB image no larger than `max_side` on its long side.

    The type is sniffed from the bytes, not any content-type. The pixel count is checked from
    the header before decoding, so decompression bombs are refused fast (ImageTooLarge).
    EXIF orientation is applied; palette, grey, alpha (composited on white), CMYK, 16-bit and
    animated (first frame) images become RGB. Anything unreadable raises ImageInvalid.
    """
    if max_side < 1:
        raise ValueError("max_side must be at least 1")
    with pillow_guard():
        loaded = load_checked(data, field=field, max_pixels=max_pixels, fit_side=max_side)
        try:
            rgb = to_rgb(loaded.image)
        except Exception as exc:  # a mode Pillow cannot convert (LAB, HSV, ...)
            raise ImageInvalid(
                f"{field}: the image's colour mode {loaded.image.mode!r} cannot be read "
                f"({_short(exc)}); re-save it as an RGB PNG or JPEG"
            ) from None
        width, height = loaded.original_size
        scaled = max(width, height) > max_side
        if scaled:
            factor = max_side / max(width, height)
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return DecodedImage(
        image=rgb, original_size=(width, height), scaled=scaled, format=loaded.format
    )
