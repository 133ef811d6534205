"""The opencv engine: classical inpainting of the masked region, no weights, CPU."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

from openedits.engines.base import (
    Capabilities,
    EngineInfo,
    Preset,
    ProgressCallback,
    ShouldCancel,
    never_cancel,
    no_progress,
)
from openedits.errors import InvalidInput, TaskCancelled

if TYPE_CHECKING:
    from openedits.settings import Settings

__all__ = ["OpenCVEngine"]

# Four genuinely different fills: both of OpenCV's algorithms (Telea's fast marching and
# Navier-Stokes), each at full resolution (sharp, local) and at a quarter of it (pulling colour
# from four times further away, which reads as a smoother fill). The coarse passes replace a
# wide radius: inpainting cost grows with the radius squared, so radius 15 at full size costs
# about 25x radius 3, while radius 3 at quarter size costs less than the full-size pass.
_VARIANTS = (
    (cv2.INPAINT_TELEA, 1),
    (cv2.INPAINT_NS, 1),
    (cv2.INPAINT_TELEA, 4),
    (cv2.INPAINT_NS, 4),
)
_RADIUS = 3
# The quarter-size passes need at least two pixels a side to have anything to pull colour from.
MIN_SIDE = 8


def _inpaint(bgr: np.ndarray, mask: np.ndarray, algorithm: int, scale: int) -> np.ndarray:
    """Inpaint at 1/scale of the size; the fill is brought back to full size."""
    if scale == 1:
        return cv2.inpaint(bgr, mask, _RADIUS, algorithm)
    h, w = mask.shape
    small_size = (max(1, w // scale), max(1, h // scale))
    small = cv2.resize(bgr, small_size, interpolation=cv2.INTER_AREA)
    # Any coverage marks a small pixel as masked, so no masked colour leaks into the fill.
    small_mask = (cv2.resize(mask, small_size, interpolation=cv2.INTER_AREA) > 0).astype(np.uint8)
    filled = cv2.inpaint(small, small_mask * 255, _RADIUS, algorithm)
    return cv2.resize(filled, (w, h), interpolation=cv2.INTER_CUBIC)


class OpenCVEngine:
    """Removes what the mask covers by inpainting from the surrounding pixels.

    It honours the mask, not the prompt. The seed only matters past four variants, where
    further fills add seeded grain so that every variant still differs.
    """

    name = "opencv"
    capabilities = Capabilities(needs_mask=True, honours_prompt=False, batch_size=4)

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenCVEngine:
        """Build from settings (nothing to configure)."""
        return cls()

    def load(self, device: str = "auto") -> None:
        """Nothing to load."""

    def info(self) -> EngineInfo:
        """For /healthz."""
        return EngineInfo(name=self.name, device="cpu", model=None, loaded=True)

    def validate(self, image: Image.Image, mask: Image.Image | None, prompt: str) -> None:
        """Inpainting needs to know what to remove."""
        if mask is None:
            raise InvalidInput(
                "mask is required by the opencv engine (it removes what the mask covers); "
                "send a mask (white = regenerate, black = keep), or configure a diffusion model "
                "with OPENEDITS_DIFFUSERS_MODEL to edit whole images from the prompt"
            )
        if mask.size != image.size:
            raise InvalidInput(f"mask size {mask.size} differs from the image size {image.size}")
        if min(image.size) < MIN_SIDE:
            raise InvalidInput(
                f"image is {image.width}x{image.height} px, too small for the opencv engine: it "
                f"fills the mask from the pixels around it and needs at least {MIN_SIDE} px a "
                "side to make four different fills; send a larger image"
            )
        if not (np.asarray(mask.convert("L")) < 128).any():
            raise InvalidInput(
                "mask covers the whole image (no black pixel): the opencv engine fills the "
                "masked region from the pixels it keeps, so nothing is left to fill from; "
                "paint only the region to remove, or configure a diffusion model with "
                "OPENEDITS_DIFFUSERS_MODEL to repaint whole images from the prompt"
            )

    def edit(
        self,
        image: Image.Image,
        mask: Image.Image | None,
        prompt: str,
        *,
        n: int,
        seed: int,
        preset: Preset,
        on_progress: ProgressCallback = no_progress,
        should_cancel: ShouldCancel = never_cancel,
    ) -> list[Image.Image]:
        """Inpaint `n` ways; pixels outside the mask are copied from the input."""
        self.validate(image, mask, prompt)
        assert mask is not None
        rgb = np.asarray(image.convert("RGB"))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        m = (np.asarray(mask.convert("L")) >= 128).astype(np.uint8) * 255
        keep = m == 0

        def fill(i: int) -> np.ndarray:
            algorithm, scale = _VARIANTS[i % len(_VARIANTS)]
            filled = _inpaint(bgr, m, algorithm, scale)[:, :, ::-1]
            if i >= len(_VARIANTS):
                filled = _grain(filled, seed + i)
            return np.where(keep[:, :, None], rgb, filled)

        # cv2.inpaint releases the GIL, so the variants run side by side on the cores there are.
        results: list[np.ndarray | None] = [None] * n
        with ThreadPoolExecutor(max_workers=min(n, os.cpu_count() or 1)) as pool:
            futures = {}
            for i in range(n):
                if should_cancel():
                    break
                futures[pool.submit(fill, i)] = i
            done = 0
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                done += 1
                if should_cancel():
                    for f in futures:
                        f.cancel()
                    raise TaskCancelled("the task was cancelled")
                on_progress(done / n)
        if done < n:
            raise TaskCancelled("the task was cancelled")
        return _distinct([r for r in results if r is not None], ~keep, seed)


def _grain(filled: np.ndarray, seed: int) -> np.ndarray:
    """The fill with seeded grain: a further variant that differs from the plain fills."""
    rng = np.random.default_rng(seed)
    grain = rng.integers(-6, 7, size=filled.shape, dtype=np.int16)
    grained: np.ndarray = np.clip(filled.astype(np.int16) + grain, 0, 255).astype(np.uint8)
    return grained


def _distinct(fills: list[np.ndarray], region: np.ndarray, seed: int) -> list[Image.Image]:
    """The fills as images, every one different inside the mask.

    Around a region of one flat colour every algorithm fills with that colour; such a repeat
    gets seeded grain, so the four variants are never copies of each other."""
    seen: set[bytes] = set()
    out = []
    for i, arr in enumerate(fills):
        inside = arr[region].tobytes()
        attempt = 0
        # Bounded: an empty region (nothing to fill) has only one possible fill.
        while inside in seen and attempt < 8:
            attempt += 1
            arr = np.where(region[:, :, None], _grain(arr, seed + 1000 * attempt + i), arr)
            inside = arr[region].tobytes()
        seen.add(inside)
        out.append(Image.fromarray(np.ascontiguousarray(arr), "RGB"))
    return out
