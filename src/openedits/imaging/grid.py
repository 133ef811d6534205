"""The 2x2 grid the contract returns: four variants of one size, side by side."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

__all__ = ["make_grid"]


def make_grid(images: Sequence[Image.Image]) -> Image.Image:
    """Tile four same-size images into one RGB grid of 2W x 2H.

    Order is reading order: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right, matching
    the sub-image names 0_0 ... 0_3. Raises ValueError unless there are four of one size.
    """
    if len(images) != 4:
        raise ValueError(f"a grid needs exactly 4 images, got {len(images)}")
    width, height = images[0].size
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"grid images must share one size, got {sorted(sizes)}")
    grid = Image.new("RGB", (2 * width, 2 * height))
    for index, im in enumerate(images):
        tile = im if im.mode == "RGB" else im.convert("RGB")
        grid.paste(tile, ((index % 2) * width, (index // 2) * height))
    return grid
