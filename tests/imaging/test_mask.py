"""decode_mask and composite: the contract's mask rules, exactly, and hostile bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from openedits.errors import ImageInvalid, ImageTooLarge, InvalidInput, OpenEditsError
from openedits.imaging.mask import composite, decode_mask, kept_outside
from tests.imaging.conftest import encode, quadrants

SIZE = (64, 48)
BOX = (16, 8, 40, 32)  # on 8-pixel boundaries, so JPEG blocks don't straddle its edges


def expected(size: tuple[int, int] = SIZE, box: tuple[int, int, int, int] = BOX) -> np.ndarray:
    want = np.zeros((size[1], size[0]), dtype=np.uint8)
    want[box[1] : box[3], box[0] : box[2]] = 255
    return want


def painted(
    mode: str, background: object, ink: object, size: tuple[int, int] = SIZE
) -> Image.Image:
    image = Image.new(mode, size, background)  # type: ignore[arg-type]
    image.paste(ink, BOX)  # type: ignore[arg-type]
    return image


def mask_of(data: bytes, size: tuple[int, int] = SIZE) -> np.ndarray:
    mask = decode_mask(data, size, max_pixels=1_000_000)
    assert mask.mode == "L"
    assert mask.size == size
    values = np.asarray(mask)
    assert set(np.unique(values)) <= {0, 255}
    return values


@pytest.mark.parametrize(
    ("mode", "background", "ink"),
    [
        ("L", 0, 255),
        ("1", 0, 1),
        ("RGB", (0, 0, 0), (255, 255, 255)),
        ("RGB", (127, 127, 127), (128, 128, 128)),  # the threshold: luminance >= 128
        ("RGB", (0, 0, 255), (255, 255, 0)),  # colours count by luminance
        ("RGBA", (0, 0, 0, 255), (255, 255, 255, 255)),  # opaque alpha: read by colour
        ("P", 0, 1),
    ],
)
def test_white_regenerates_black_keeps(mode: str, background: object, ink: object) -> None:
    image = painted(mode, background, ink)
    if mode == "P":
        image.putpalette([0, 0, 0, 255, 255, 255])
    assert np.array_equal(mask_of(encode(image)), expected())


@pytest.mark.parametrize("quality", [95, 50, 10])
def test_jpeg_noise_is_absorbed_by_the_threshold(quality: int) -> None:
    data = encode(painted("RGB", (0, 0, 0), (255, 255, 255)), "JPEG", quality=quality)
    assert np.array_equal(mask_of(data), expected())
    grey = encode(painted("L", 20, 235), "JPEG", quality=quality)
    assert np.array_equal(mask_of(grey), expected())


@pytest.mark.parametrize(
    ("mode", "background", "ink"),
    [
        ("RGBA", (0, 0, 0, 255), (0, 0, 0, 0)),  # black, a transparent hole: the hole changes
        ("RGBA", (255, 255, 255, 255), (255, 255, 255, 0)),  # white, same hole
        ("RGBA", (10, 10, 10, 200), (12, 10, 10, 30)),  # nearly uniform, soft alpha
        ("LA", (0, 255), (0, 0)),
    ],
)
def test_uniform_colour_with_alpha_is_read_by_alpha(
    mode: str, background: object, ink: object
) -> None:
    assert np.array_equal(mask_of(encode(painted(mode, background, ink))), expected())


def test_palette_transparency_is_alpha() -> None:
    image = painted("P", 0, 1)
    image.putpalette([0, 0, 0, 0, 0, 0])
    assert np.array_equal(mask_of(encode(image, "PNG", transparency=1)), expected())
    webp = encode(painted("RGBA", (0, 0, 0, 255), (0, 0, 0, 0)), "WEBP", lossless=True)
    assert np.array_equal(mask_of(webp), expected())


def test_coloured_strokes_on_transparency_read_by_luminance() -> None:
    # White paint on an empty (transparent black) layer: the paint is what changes.
    layer = painted("RGBA", (0, 0, 0, 0), (255, 255, 255, 255))
    assert np.array_equal(mask_of(encode(layer)), expected())


def test_other_size_resized_nearest() -> None:
    big = Image.new("L", (128, 96), 0)
    big.paste(255, (32, 16, 80, 64))  # BOX at twice the size
    assert np.array_equal(mask_of(encode(big)), expected())
    small = Image.new("L", (16, 12), 0)
    small.paste(255, (4, 2, 10, 8))
    assert np.array_equal(mask_of(encode(small)), expected())


def test_exif_orientation_of_the_mask_applied() -> None:
    # Stored 48x64 and tagged "rotate 90 clockwise": displayed, it is BOX on a 64x48 mask.
    upright = Image.fromarray(expected())
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    assert np.array_equal(mask_of(encode(stored, "PNG", exif=exif.tobytes())), expected())


def test_sixteen_bit_mask() -> None:
    deep = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint16)
    deep[BOX[1] : BOX[3], BOX[0] : BOX[2]] = 65535
    assert np.array_equal(mask_of(encode(Image.fromarray(deep))), expected())


@pytest.mark.parametrize(
    ("image", "needle"),
    [
        (Image.new("L", SIZE, 0), "mask selects nothing: no pixel is white (luminance >= 128)"),
        (Image.new("RGB", SIZE, (127, 127, 127)), "no pixel is white"),
        (Image.new("RGBA", SIZE, (0, 0, 0, 255)), "no pixel is white"),
        (Image.new("RGBA", SIZE, (0, 0, 0, 200)), "no pixel is transparent (alpha < 128)"),
    ],
)
def test_mask_that_selects_nothing_says_so(image: Image.Image, needle: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        decode_mask(encode(image), SIZE, max_pixels=1_000_000)
    assert needle in str(caught.value)
    assert "send no mask to let the whole image change" in str(caught.value)


def test_selection_lost_in_resizing_says_so() -> None:
    image = Image.new("L", (640, 480), 0)
    image.putpixel((3, 3), 255)
    with pytest.raises(InvalidInput, match="once resized from 640x480 to the image's 64x48"):
        decode_mask(encode(image), SIZE, max_pixels=1_000_000)


def test_whole_white_mask_is_fine() -> None:
    assert np.all(mask_of(encode(Image.new("L", SIZE, 255))) == 255)


def test_mask_limits_and_garbage_name_the_field() -> None:
    with pytest.raises(ImageTooLarge, match=r"^mask is 64x48 = 3072 pixels, over the limit of 100"):
        decode_mask(encode(Image.new("L", SIZE, 255)), SIZE, max_pixels=100)
    with pytest.raises(ImageInvalid, match=r"^mask: the bytes received"):
        decode_mask(b"<html></html>", SIZE, max_pixels=1_000_000)
    with pytest.raises(ImageInvalid, match=r"^mask is empty"):
        decode_mask(b"", SIZE, max_pixels=1_000_000)


# --- composite: exact outside the mask


def test_composite_is_exact() -> None:
    rng = np.random.default_rng(7)
    original = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    edited = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    mask = Image.fromarray(expected())
    out = np.asarray(composite(original, edited, mask))
    keep = expected() == 0
    assert np.array_equal(out[keep], np.asarray(original)[keep])
    assert np.array_equal(out[~keep], np.asarray(edited)[~keep])
    assert composite(original, edited, None) is edited


def test_composite_resizes_edited_and_thresholds_soft_masks() -> None:
    original = quadrants(SIZE)
    edited = Image.new("RGB", (32, 24), (9, 9, 9))
    soft = Image.fromarray(expected() // 2 + 1)  # 1 outside, 128 inside
    out = composite(original, edited, soft)
    assert out.size == SIZE
    values = np.asarray(out)
    keep = expected() == 0
    assert np.array_equal(values[keep], np.asarray(original)[keep])
    assert np.all(values[~keep] == 9)
    assert composite(original, edited, None).size == SIZE


def test_kept_outside_equals_composite_for_each_edit() -> None:
    rng = np.random.default_rng(11)
    original = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    edits = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    soft = Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8))  # every level
    out = kept_outside(original, edits, soft)
    for edit, got in zip(edits, out, strict=True):
        want = np.asarray(composite(Image.fromarray(original), Image.fromarray(edit), soft))
        assert got.dtype == np.uint8 and np.array_equal(got, want)


# --- hypothesis

_HYPOTHESIS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_HYPOTHESIS
@given(st.binary(max_size=4096), st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]))
def test_arbitrary_bytes_only_raise_openedits_errors(data: bytes, magic: bytes) -> None:
    try:
        mask = decode_mask(magic + data, (17, 9), max_pixels=100_000)
    except OpenEditsError:
        return
    assert mask.mode == "L"
    assert mask.size == (17, 9)


@st.composite
def random_masks(draw: st.DrawFn) -> tuple[Image.Image, str]:
    mode = draw(st.sampled_from(["L", "1", "RGB", "RGBA", "LA", "P"]))
    fmt = draw(st.sampled_from(["PNG", "WEBP", "TIFF"] if "A" in mode else ["PNG", "JPEG", "BMP"]))
    if mode in ("1", "P") and fmt == "JPEG":
        fmt = "PNG"
    size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    seed = draw(st.integers(0, 2**32 - 1))
    noise = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    if draw(st.booleans()):  # uniform colour, so alpha masks take the alpha rule too
        noise[..., :3] = noise[0, 0, :3]
    return Image.fromarray(noise).convert(mode), fmt


@_HYPOTHESIS
@given(random_masks(), st.integers(1, 50), st.integers(1, 50))
def test_valid_masks_are_binary_of_the_target_size(
    case: tuple[Image.Image, str], width: int, height: int
) -> None:
    image, fmt = case
    try:
        mask = decode_mask(encode(image, fmt), (width, height), max_pixels=100_000)
    except InvalidInput as exc:
        assert "selects nothing" in str(exc)
        return
    assert mask.mode == "L"
    assert mask.size == (width, height)
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
