"""Masks: client bytes to an exact 0/255 region, and pasting edits back through it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import cv2
import numpy as np
from PIL import Image, ImageChops

from openedits.errors import ImageInvalid, InvalidInput
from openedits.imaging.decode import ALPHA_MODES, DEEP_MODES, deep_to_l, load_checked, pillow_guard

__all__ = ["composite", "decode_mask", "kept_outside"]

_THRESHOLD = 128
# How far the colour of an alpha mask may vary and still count as "uniform": lossy WebP
# alpha masks wobble a few levels around their single colour.
_UNIFORM_TOLERANCE = 16


def _threshold(im: Image.Image, *, invert: bool = False) -> Image.Image:
    """Binary L: 255 where the value is >= 128 (or < 128 when `invert`), else 0."""
    if invert:
        return im.point(lambda v: 255 if v < _THRESHOLD else 0)
    return im.point(lambda v: 255 if v >= _THRESHOLD else 0)


def _binarize(im: Image.Image) -> tuple[Image.Image, str]:
    """The regenerate region (255) of a loaded mask, and how it was read (for messages)."""
    if im.mode in DEEP_MODES:
        im = deep_to_l(im)
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        alpha = rgba.getchannel("A")
        if int(np.asarray(alpha).min()) < 255:
            rgb = rgba.convert("RGB")
            pixels = np.asarray(rgb).reshape(-1, 3)
            spread = int((pixels.max(axis=0).astype(np.int16) - pixels.min(axis=0)).max())
            if spread <= _UNIFORM_TOLERANCE:
                # One colour everywhere: the alpha channel is the only drawing, and by the
                # contract (as in other editing APIs) transparent means "regenerate".
                return _threshold(alpha, invert=True), "transparent (alpha < 128)"
            # Colour strokes on a partly transparent layer: read them as painted over black,
            # so fully transparent pixels keep the original.
            luminance = ImageChops.multiply(rgb.convert("L"), alpha)
            return _threshold(luminance), "white (luminance >= 128)"
        im = rgba.convert("RGB")
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    return _threshold(im.convert("L")), "white (luminance >= 128)"


def decode_mask(
    data: bytes, size: tuple[int, int], *, field: str = "mask", max_pixels: int
) -> Image.Image:
    """Decode client mask bytes into mode "L" with values only 0 and 255 (255 = regenerate).

    Luminance >= 128 means regenerate, so JPEG noise around black and white is harmless. A mask
    whose alpha is not fully opaque and whose colour is uniform is read by alpha instead
    (transparent = regenerate). EXIF orientation is applied; a mask of another size is resized
    (nearest neighbour) to `size`. A mask that selects nothing raises InvalidInput.
    """
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be two positive integers, not {size!r}")
    target = (int(size[0]), int(size[1]))
    with pillow_guard():
        loaded = load_checked(data, field=field, max_pixels=max_pixels, kind="mask")
        try:
            binary, rule = _binarize(loaded.image)
        except Exception as exc:  # a mode Pillow cannot convert (LAB, HSV, ...)
            raise ImageInvalid(
                f"{field}: the mask's colour mode {loaded.image.mode!r} cannot be read ({exc}); "
                "send a black-and-white PNG or JPEG"
            ) from None
        resized = binary.size != target
        if resized:
            binary = binary.resize(target, Image.Resampling.NEAREST)
    if binary.getbbox() is None:
        how = (
            f" once resized from {loaded.original_size[0]}x{loaded.original_size[1]} to the "
            f"image's {target[0]}x{target[1]}"
            if resized
            else ""
        )
        raise InvalidInput(
            f"{field} selects nothing: no pixel is {rule}{how}, so nothing would be edited; "
            "paint the region to regenerate white on black (or transparent in a PNG of one "
            "colour), or send no mask to let the whole image change"
        )
    return binary


def composite(original: Image.Image, edited: Image.Image, mask: Image.Image | None) -> Image.Image:
    """Edited pixels where `mask` is 255, the original's own pixels (bit-identical) where it is 0.

    `edited` is resized to the original's size and converted to its mode if needed; with no
    mask the (resized) edited image is returned. A mask that is not binary is thresholded at 128
    so that no pixel is ever a blend.
    """
    if edited.size != original.size:
        edited = edited.resize(original.size, Image.Resampling.LANCZOS)
    if edited.mode != original.mode:
        edited = edited.convert(original.mode)
    if mask is None:
        return edited
    if mask.mode != "L":
        mask = mask.convert("L")
    if mask.size != original.size:
        mask = mask.resize(original.size, Image.Resampling.NEAREST)
    return Image.composite(edited, original, _threshold(mask))


def kept_outside(
    original: np.ndarray,
    edited: Sequence[Image.Image | np.ndarray],
    mask: Image.Image,
    *,
    mapper: Callable[..., Iterable[np.ndarray]] = map,
) -> list[np.ndarray]:
    """`composite` for many edits of one image at once, as arrays: each of `edited` (RGB, the
    size of `original`, a height x width x 3 uint8 array) with every pixel outside `mask` set
    back to the original's, one edit per call of `mapper` (an executor's map runs them side by
    side). The mask is thresholded once; OpenCV's masked copy (one pass, no Python per pixel)
    measured a third of the time of Pillow's composite."""
    inside = (np.asarray(mask.convert("L")) >= _THRESHOLD).view(np.uint8)

    def keep(edit: Image.Image | np.ndarray) -> np.ndarray:
        kept: np.ndarray = cv2.copyTo(np.asarray(edit), inside, original.copy())
        return kept

    return list(mapper(keep, edited))
