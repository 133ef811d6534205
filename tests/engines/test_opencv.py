"""The opencv engine passes the engine contract."""

from __future__ import annotations

import numpy as np

from openedits.engines.opencv import OpenCVEngine
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
