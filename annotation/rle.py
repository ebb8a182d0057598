"""Brush masks in Label Studio's RLE format.

Label Studio stores a brush region as a run-length encoding of an RGBA image of the task's image size
(``H * W * 4`` bytes, row-major; the mask lives in the alpha channel). We delegate the bit-level format
to the SDK's converter (``label_studio_sdk.converter.brush``) so the encoding always matches what the
labelling UI reads and writes, and only add the checks the SDK leaves out: the size, and the header,
read before decoding so a hostile or corrupted RLE cannot make us allocate gigabytes.

Example::

    >>> import numpy as np
    >>> mask = np.zeros((3, 5), dtype=bool); mask[1, 2:4] = True
    >>> bool((rle_to_mask(mask_to_rle(mask), 3, 5) == mask).all())
    True
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle

# Worst case of the format: a run of one value costs 1+2+3 bits of header plus an 8-bit word
# (14 bits) per RGBA byte. A valid RLE can never be longer than this many bytes per pixel.
_MAX_RLE_BYTES_PER_PIXEL = 7
_RLE_HEADER_BYTES = 8


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Encodes a 2-D boolean mask (H x W) as Label Studio RLE."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H x W), got shape {mask.shape}")
    if mask.size == 0:
        raise ValueError("mask is empty (zero height or width)")
    return [int(v) for v in mask2rle(np.where(mask.astype(bool), 255, 0).astype(np.uint8))]


def rle_length(rle: Sequence[int]) -> int:
    """The number of decoded values (H * W * 4 for a valid brush) from the RLE's 32-bit header."""
    if len(rle) < 5:
        raise ValueError("RLE is too short to hold its header")
    return int.from_bytes(bytes(int(b) for b in rle[:4]), "big")


def validate_rle(rle: Any, height: int, width: int) -> list[int]:
    """Checks that ``rle`` is a list of bytes whose header says H * W * 4 values; returns it as ints.

    Raises ``ValueError`` with a message that names both sizes when they disagree.
    """
    if not isinstance(rle, list) or not rle:
        raise ValueError("RLE must be a non-empty list of integers")
    if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in rle):
        raise ValueError("RLE must hold integers between 0 and 255")
    expected = height * width * 4
    got = rle_length(rle)
    if got != expected:
        raise ValueError(
            f"mask is {got / 4:g} pixels but the image is {width}x{height} ({width * height} pixels)"
        )
    if len(rle) > _RLE_HEADER_BYTES + _MAX_RLE_BYTES_PER_PIXEL * expected // 4:
        raise ValueError(f"RLE is longer ({len(rle)} bytes) than any mask of a {width}x{height} image")
    return rle


def rle_to_mask(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Decodes Label Studio RLE to a boolean H x W mask (alpha channel > 0).

    Raises ``ValueError("mask is WxH but the image is ...")`` when the RLE does not describe an image of
    exactly ``height`` x ``width`` pixels, and ``ValueError`` for a corrupt encoding.
    """
    values = validate_rle(list(rle), height, width)
    try:
        flat = decode_rle(values)
    except (ValueError, IndexError, OverflowError) as exc:  # truncated bit stream, impossible word size
        raise ValueError(f"RLE is corrupt: {exc}") from exc
    if flat.size != height * width * 4:
        raise ValueError(
            f"mask is {flat.size // 4} pixels but the image is {width}x{height} ({width * height} pixels)"
        )
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def brush_result(
    mask: np.ndarray,
    from_name: str,
    to_name: str,
    label: str,
    *,
    height: int | None = None,
    width: int | None = None,
) -> dict[str, Any]:
    """A Label Studio ``brushlabels`` result for ``mask`` (H x W bool).

    ``height``/``width``, when given, are the image's size: a mask of another size raises
    ``ValueError("mask is WxH but the image is ...")`` instead of being silently misplaced.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H x W), got shape {mask.shape}")
    h, w = mask.shape
    if (height is not None and height != h) or (width is not None and width != w):
        raise ValueError(f"mask is {w}x{h} but the image is {width}x{height}")
    return {
        "type": "brushlabels",
        "from_name": from_name,
        "to_name": to_name,
        "original_width": int(w),
        "original_height": int(h),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
    }
