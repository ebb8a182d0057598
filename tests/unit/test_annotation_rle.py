"""Brush RLE: pixel-for-pixel round trips at non-square sizes, and size checks."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from annotation.rle import brush_result, mask_to_rle, rle_length, rle_to_mask


def _disc(height: int, width: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.mark.parametrize("height,width", [(300, 517), (517, 300), (1, 9), (7, 1), (200, 310)])
def test_random_mask_round_trip(height: int, width: int) -> None:
    rng = np.random.default_rng(height * 1000 + width)
    mask = rng.random((height, width)) < 0.3
    back = rle_to_mask(mask_to_rle(mask), height, width)
    assert back.dtype == bool and back.shape == (height, width)
    assert np.array_equal(back, mask)


@pytest.mark.parametrize(
    "name",
    ["empty", "full", "disc", "stripes", "border", "single_last_pixel"],
)
def test_shaped_mask_round_trip(name: str) -> None:
    height, width = 300, 517
    mask = np.zeros((height, width), dtype=bool)
    if name == "full":
        mask[:] = True
    elif name == "disc":
        mask = _disc(height, width, 120.5, 400.2, 70)
    elif name == "stripes":
        mask[:, ::3] = True
    elif name == "border":
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    elif name == "single_last_pixel":
        mask[-1, -1] = True
    back = rle_to_mask(mask_to_rle(mask), height, width)
    assert np.array_equal(back, mask)


def test_orientation_is_row_major_like_label_studio() -> None:
    """The SDK's documented reading (reshape(H, W, 4)[:, :, 3]) gives back our mask: rows are rows."""
    mask = np.zeros((3, 5), dtype=bool)
    mask[0, 4] = True  # top-right corner
    flat = decode_rle(mask_to_rle(mask))
    assert flat.size == 3 * 5 * 4
    assert np.array_equal(flat.reshape(3, 5, 4)[:, :, 3] > 0, mask)


def test_uint8_and_int_masks_are_accepted() -> None:
    mask = np.zeros((4, 6), dtype=np.uint8)
    mask[1:3, 2:5] = 1
    assert np.array_equal(rle_to_mask(mask_to_rle(mask), 4, 6), mask.astype(bool))


def test_wrong_size_is_detected_with_both_sizes_in_the_message() -> None:
    rle = mask_to_rle(np.ones((300, 517), dtype=bool))
    assert rle_length(rle) == 300 * 517 * 4
    with pytest.raises(ValueError, match=r"mask is .* but the image is 310x200"):
        rle_to_mask(rle, 200, 310)
    with pytest.raises(ValueError, match=r"but the image is 517x301"):
        rle_to_mask(rle, 301, 517)  # one row more


def test_transposed_size_with_same_pixel_count_is_caught_by_brush_result() -> None:
    """RLE carries only a pixel count, so a transposed size is caught on the declared width/height."""
    mask = np.ones((300, 517), dtype=bool)
    with pytest.raises(ValueError, match=r"mask is 517x300 but the image is 300x517"):
        brush_result(mask, "defect", "image", "defect", height=517, width=300)


@pytest.mark.parametrize(
    "rle",
    [[], [1, 2, 3], [0, 0, 0, 4, 7, 255, 255, 255, 255], [0, 0, 9, 176, 57, 27, 300], [0, 0, 9, 176, 57, 27, -1],
     [0, 0, 9, 176, 57.5, 27], "abc", [True, 0, 9, 176, 57, 27]],
)
def test_corrupt_rle_is_a_value_error(rle: object) -> None:
    with pytest.raises(ValueError):
        rle_to_mask(rle, 20, 31)  # type: ignore[arg-type]


def test_truncated_rle_is_a_value_error() -> None:
    rng = np.random.default_rng(0)
    rle = mask_to_rle(rng.random((20, 31)) < 0.5)
    with pytest.raises(ValueError):
        rle_to_mask(rle[: len(rle) // 2], 20, 31)


def test_huge_declared_size_is_refused_before_decoding() -> None:
    header = list((2**32 - 4).to_bytes(4, "big")) + [0xFF, 0xFF, 0xFF]
    with pytest.raises(ValueError, match="but the image is"):
        rle_to_mask(header, 20, 31)


def test_brush_result_shape() -> None:
    mask = np.zeros((200, 310), dtype=bool)
    mask[50:60, 100:150] = True
    result = brush_result(mask, "defect", "image", "scratch")
    assert result["type"] == "brushlabels"
    assert result["from_name"] == "defect" and result["to_name"] == "image"
    assert (result["original_width"], result["original_height"]) == (310, 200)
    assert result["image_rotation"] == 0
    assert result["value"]["format"] == "rle" and result["value"]["brushlabels"] == ["scratch"]
    assert np.array_equal(rle_to_mask(result["value"]["rle"], 200, 310), mask)


def test_non_2d_masks_are_refused() -> None:
    with pytest.raises(ValueError):
        mask_to_rle(np.zeros((2, 3, 4), dtype=bool))
    with pytest.raises(ValueError):
        brush_result(np.zeros(5, dtype=bool), "defect", "image", "defect")
