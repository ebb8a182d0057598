"""Which patches the Review grid shows, so that one defect does not fill the page.

An image is scored by its hottest patches, and one large defect lights up many neighbouring ones (the
scorer's top patches are 3x3-cell windows two cells apart, so windows of one defect still overlap).
The grid therefore shows at most `per_image` crops of one image, and skips a patch that overlaps an
already chosen patch of the same image at all (`max_iou` 0): a second crop of an image is a second
hot spot, not the same defect again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.services.imaging import clip_box

MAX_IOU = 0.0


@dataclass(frozen=True)
class Crop:
    """One cell of the Review grid."""

    image_id: int
    box: tuple[int, int, int, int]  # in image pixels
    patch_score: float
    rank: int  # 0 for the image's hottest shown patch


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def pick_patches(patches: Iterable[Mapping[str, Any]], width: int, height: int, per_image: int = 1,
                 max_iou: float = MAX_IOU) -> list[tuple[tuple[int, int, int, int], float]]:
    """Up to `per_image` (box, score) of one image, hottest first, no two overlapping by more than
    `max_iou`. An image without stored patches gets its whole frame, so it is still shown."""
    ordered = sorted(patches, key=lambda p: float(p.get("score", 0.0)), reverse=True)
    chosen: list[tuple[tuple[int, int, int, int], float]] = []
    for patch in ordered:
        if len(chosen) >= per_image:
            break
        box = clip_box(patch["box"], width, height)
        if all(iou(box, kept) <= max_iou for kept, _ in chosen):
            chosen.append((box, float(patch.get("score", 0.0))))
    if not chosen:
        chosen.append(((0, 0, width, height), 0.0))
    return chosen


def crops_for(image_id: int, patches: Iterable[Mapping[str, Any]], width: int, height: int,
              per_image: int = 1, max_iou: float = MAX_IOU) -> list[Crop]:
    return [Crop(image_id, box, score, rank)
            for rank, (box, score) in enumerate(pick_patches(patches, width, height, per_image, max_iou))]
