"""The defect mask a model proposes for an image (Label Studio's pre-annotation): its heat map above the
class's pixel threshold, without specks.

The threshold is the model's pixel threshold (``DMAD.pixel_threshold_``: a high quantile of validation
normal pixel scores, all classes together; with the default scorer the scores are already in each class's
unit). Two per-class thresholds from validation data were measured against it and fitted the defects worse
(a class's own 99.9 % quantile, and the lowest level leaving at most one patch marked on its normals:
bottle 30.4 vs 36.8 IoU, tire 6.0 vs 6.7 at K = 10; benchmarks/preannotation.py, docs/results.md). Connected components
smaller than one patch are dropped (``skimage.morphology.remove_small_objects``): a patch is the model's
unit of evidence, and a speck smaller than one is the smoothing's ringing at a border, not a defect an
inspector would draw. Measured per class with ``benchmarks/preannotation.py`` (docs/results.md).

Example::

    heat = model.anomaly_map(pred.patch_scores, (h, w))
    mask = defect_mask(heat, model.pixel_thresholds_[pred.item.category], patch_area(pred.patch_scores.shape, (h, w)))
"""

from __future__ import annotations

import numpy as np
from skimage.morphology import remove_small_objects


def patch_area(grid_shape: tuple[int, int], image_shape: tuple[int, int]) -> int:
    """Image pixels one patch-grid cell covers."""
    return max(1, int(round(image_shape[0] / grid_shape[0] * image_shape[1] / grid_shape[1])))


def defect_mask(heat: np.ndarray, threshold: float, min_area: int) -> np.ndarray:
    """``heat >= threshold`` (bool, the heat map's shape) without connected components under ``min_area``
    pixels (8-connectivity)."""
    mask = np.asarray(heat) >= threshold
    if min_area > 1 and mask.any():
        mask = remove_small_objects(mask, max_size=min_area - 1, connectivity=2)  # drops sizes <= max_size
    return mask

