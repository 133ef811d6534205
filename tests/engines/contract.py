"""EngineContract: the checks every engine passes, inherited by each engine's test class."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image, ImageDraw

from openedits.engines.base import Engine
from openedits.errors import InvalidInput, TaskCancelled


def make_test_image(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A deterministic picture with structure: a gradient, a disc and a bar."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    rgb = np.stack([np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)),
                    np.full((h, w), 96, np.float32)], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((w // 4, h // 4, w // 2, h // 2 + h // 4), fill=(220, 40, 40))
    draw.rectangle((w // 2, h // 3, w - 8, h // 3 + 6), fill=(20, 20, 20))
    return image


def make_test_mask(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """Mode L, 255 over a box around the disc (regenerate), 0 elsewhere (keep)."""
    w, h = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((w // 4 - 2, h // 4 - 2, w // 2 + 2, h // 2 + h // 4 + 2),
                                   fill=255)
    return mask


class EngineContract:
    """Inherit this and define `make_engine()`; every engine gets the same checks."""

    image_size: ClassVar[tuple[int, int]] = (96, 64)
    preset: ClassVar[str] = "turbo"
    with_mask: ClassVar[bool] = True
    """False runs the same checks on unmasked edits (the whole image is the region)."""

    def make_engine(self) -> Engine:
        raise NotImplementedError

    @pytest.fixture
    def engine(self) -> Engine:
        engine = self.make_engine()
        engine.load("cpu")
        return engine

    @pytest.fixture
    def image(self) -> Image.Image:
        return make_test_image(self.image_size)

    @pytest.fixture
    def mask(self) -> Image.Image | None:
        return make_test_mask(self.image_size) if self.with_mask else None

    def _edit(self, engine: Engine, image: Image.Image, mask: Image.Image | None,
              **kwargs: Any) -> list[Image.Image]:
        kwargs.setdefault("n", 4)
        kwargs.setdefault("seed", 1234)
        kwargs.setdefault("preset", self.preset)
        return engine.edit(image, mask, "a red apple", **kwargs)

    def test_satisfies_protocol(self, engine: Engine) -> None:
        assert isinstance(engine, Engine)
        assert engine.info().name == engine.name

    def test_four_variants_of_input_size(self, engine: Engine, image: Image.Image,
                                         mask: Image.Image | None) -> None:
        variants = self._edit(engine, image, mask)
        assert len(variants) == 4
        for v in variants:
            assert v.size == image.size
            assert v.mode == "RGB"

    def test_pixels_outside_mask_are_the_input(self, engine: Engine, image: Image.Image,
                                               mask: Image.Image | None) -> None:
        if mask is None:
            pytest.skip("no mask: every pixel may change")
        keep = np.asarray(mask) == 0
        original = np.asarray(image)
        for v in self._edit(engine, image, mask):
            assert np.array_equal(np.asarray(v)[keep], original[keep])

    def test_variants_differ_inside_mask(self, engine: Engine, image: Image.Image,
                                         mask: Image.Image | None) -> None:
        region = np.full(image.size[::-1], 255, np.uint8) if mask is None else np.asarray(mask)
        inside = region == 255
        arrays = [np.asarray(v)[inside] for v in self._edit(engine, image, mask)]
        for i in range(4):
            for j in range(i + 1, 4):
                assert not np.array_equal(arrays[i], arrays[j]), f"variants {i} and {j} equal"
        # And the edit did change something the mask selected.
        assert any(not np.array_equal(a, np.asarray(image)[inside]) for a in arrays)

    def test_same_seed_reproduces(self, engine: Engine, image: Image.Image,
                                  mask: Image.Image | None) -> None:
        first = self._edit(engine, image, mask, seed=7)
        second = self._edit(engine, image, mask, seed=7)
        for a, b in zip(first, second, strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))

    def test_mask_of_other_size_refused(self, engine: Engine, image: Image.Image) -> None:
        wrong = Image.new("L", (image.width + 8, image.height), 255)
        with pytest.raises(InvalidInput):
            engine.validate(image, wrong, "a red apple")

    def test_missing_mask_refused_when_needed(self, engine: Engine, image: Image.Image) -> None:
        if not engine.capabilities.needs_mask:
            pytest.skip(f"{engine.name} edits without a mask")
        with pytest.raises(InvalidInput, match="mask"):
            engine.validate(image, None, "a red apple")

    def test_progress_rises_to_done(self, engine: Engine, image: Image.Image,
                                    mask: Image.Image | None) -> None:
        seen: list[float] = []
        self._edit(engine, image, mask, on_progress=seen.append)
        assert seen, "no progress reported"
        assert all(0.0 <= f <= 1.0 for f in seen)
        assert seen == sorted(seen)
        assert seen[-1] == pytest.approx(1.0)

    def test_cancel_stops_at_a_step(self, engine: Engine, image: Image.Image,
                                    mask: Image.Image | None) -> None:
        steps: list[float] = []
        with pytest.raises(TaskCancelled):
            self._edit(engine, image, mask, on_progress=steps.append,
                       should_cancel=lambda: len(steps) >= 1)
        assert len(steps) >= 1
        # The engine stays usable after a cancel.
        assert len(self._edit(engine, image, mask)) == 4
