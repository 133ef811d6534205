"""make_grid: four variants tiled in reading order."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from openedits.imaging.grid import make_grid

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def test_grid_is_2w_by_2h_in_reading_order() -> None:
    tiles = [Image.new("RGB", (30, 20), colour) for colour in COLOURS]
    grid = make_grid(tiles)
    assert grid.mode == "RGB"
    assert grid.size == (60, 40)
    values = np.asarray(grid)
    for index, colour in enumerate(COLOURS):
        left, top = (index % 2) * 30, (index // 2) * 20
        assert np.all(values[top : top + 20, left : left + 30] == colour)


def test_tiles_are_copied_exactly() -> None:
    rng = np.random.default_rng(3)
    tiles = [Image.fromarray(rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)) for _ in range(4)]
    values = np.asarray(make_grid(tiles))
    assert np.array_equal(values[7:, :5], np.asarray(tiles[2]))
    assert np.array_equal(values[:7, 5:], np.asarray(tiles[1]))


def test_other_modes_become_rgb() -> None:
    tiles = [Image.new("L", (4, 4), 200), *(Image.new("RGB", (4, 4)) for _ in range(3))]
    assert make_grid(tiles).getpixel((0, 0)) == (200, 200, 200)


def test_wrong_count_or_sizes_refused() -> None:
    with pytest.raises(ValueError, match="exactly 4 images, got 3"):
        make_grid([Image.new("RGB", (4, 4))] * 3)
    with pytest.raises(ValueError, match="share one size"):
        make_grid([Image.new("RGB", (4, 4))] * 3 + [Image.new("RGB", (4, 5))])
