"""The opencv engine passes the engine contract."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from openedits.engines.opencv import OpenCVEngine
from openedits.errors import InvalidInput
from openedits.settings import Settings
from tests.engines.contract import EngineContract, make_test_image, make_test_mask


class TestOpenCVEngine(EngineContract):
    def make_engine(self) -> OpenCVEngine:
        return OpenCVEngine.from_settings(Settings())


def test_fill_removes_the_masked_object() -> None:
    # The red disc sits inside the mask; inpainting from its surroundings removes the red.
    image, mask = make_test_image(), make_test_mask()
    inside = np.asarray(mask) == 255
    red_before = (np.asarray(image)[inside][:, 0] > 200).mean()
    for v in OpenCVEngine().edit(image, mask, "", n=4, seed=0, preset="fast"):
        red_after = (np.asarray(v)[inside][:, 0] > 200).mean()
        assert red_after < red_before / 2


def test_more_than_four_variants_stay_distinct() -> None:
    image, mask = make_test_image(), make_test_mask()
    variants = OpenCVEngine().edit(image, mask, "", n=6, seed=3, preset="fast")
    arrays = [np.asarray(v).tobytes() for v in variants]
    assert len(set(arrays)) == 6


def test_a_mask_over_the_whole_image_is_refused() -> None:
    # Nothing is left to fill from: today's fills would be the input twice and one blur twice.
    image = make_test_image()
    engine = OpenCVEngine()
    with pytest.raises(InvalidInput, match="nothing is left to fill from"):
        engine.validate(image, Image.new("L", image.size, 255), "")
    with pytest.raises(InvalidInput, match="whole image"):
        engine.edit(image, Image.new("L", image.size, 255), "", n=4, seed=0, preset="fast")


@pytest.mark.parametrize("size", [(1, 1), (5, 40), (40, 3)])
def test_an_image_too_small_to_fill_four_ways_is_refused(size: tuple[int, int]) -> None:
    mask = Image.new("L", size, 0)
    mask.putpixel((0, 0), 255)
    with pytest.raises(InvalidInput, match="too small"):
        OpenCVEngine().validate(Image.new("RGB", size, (9, 9, 9)), mask, "")


def test_a_flat_surround_still_gives_four_different_fills() -> None:
    # Every algorithm fills a hole in one flat colour with that colour; the variants must
    # still differ inside the mask (and keep the input outside it).
    image = Image.new("RGB", (32, 32), (120, 130, 140))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 20, 20))
    inside = np.asarray(mask) == 255
    variants = OpenCVEngine().edit(image, mask, "", n=4, seed=5, preset="fast")
    insides = [np.asarray(v)[inside].tobytes() for v in variants]
    assert len(set(insides)) == 4
    for v in variants:
        assert np.array_equal(np.asarray(v)[~inside], np.asarray(image)[~inside])
