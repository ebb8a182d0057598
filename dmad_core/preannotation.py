"""The defect mask a model proposes for an image (Label Studio's pre-annotation and `dmad serve`'s RLE heat
map): its heat map above a level, without specks, and only the region around the image's hottest point, cut
at a share of that peak: for a class whose defects inspectors have drawn, the share that fits their masks;
for another, half the peak.

Why a relative level: one threshold on the heat map cannot fit defects of very different strength (a
faint scratch and a broken bottle neck peak at different heights, and the smoothing spreads each in
proportion). Measured at K = 10 (docs/results.md, ``benchmarks/preannotation.py``), the best *single*
threshold chosen on the test masks themselves reaches IoU 43.0 on bottle and 11.1 on commutator; the
relative level chosen on the annotated masks reaches 45.8 and 14.7 (tire 6.9 against 7.8; its defects
are a few pixels wide, under the map's 8-pixel cells). The share is chosen per class on the masks
inspectors drew (``choose_peak_share``), never on test images; validation normals cannot say where a
defect ends. A class without drawn masks is cut at half its peak (``UNDRAWN_PEAK_SHARE``): the pixel
threshold alone (a high quantile of validation normal pixel scores) marks the map's halo, which on bottle
is larger than the defect. Nothing below the pixel threshold is ever marked.

Connected components smaller than one patch are dropped (``skimage.morphology.remove_small_objects``):
a patch is the model's unit of evidence, and a speck smaller than one is the smoothing's ringing at a
border, not a defect an inspector would draw.

Example::

    heat = model.anomaly_map(pred.patch_scores, (h, w))
    area = patch_area(pred.patch_scores.shape, (h, w))
    state = model.fitted()
    share = peak_share_for(state.mask_peak_shares, pred.item.category)
    mask = defect_mask(heat, state.pixel_threshold, area, share)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from skimage.measure import label
from skimage.morphology import remove_small_objects

if TYPE_CHECKING:
    from dmad_core.config import DMADConfig

PEAK_SHARES = tuple(float(s) for s in np.round(np.linspace(0.3, 0.95, 14), 3))  # the levels tried
# A class without drawn masks: half of each image's peak, the extent that "full width at half maximum"
# gives a smoothed blob. Measured unsupervised (docs/results.md): IoU 44.7 / 9.5 / 4.4 on bottle /
# commutator / tire against 32.3 / 8.3 / 4.3 for the pixel threshold alone.
UNDRAWN_PEAK_SHARE = 0.5


def peak_share_for(shares: Mapping[str, float], category: str) -> float:
    """The share of an image's peak that a class's proposed masks are cut at: the one chosen on its drawn
    masks (``choose_peak_share``, in ``shares``), else ``UNDRAWN_PEAK_SHARE``. Every place that proposes a
    mask (Label Studio's pre-annotation, ``dmad serve``'s RLE) reads it here, so they agree."""
    return float(shares.get(category, UNDRAWN_PEAK_SHARE))


def patch_area(grid_shape: tuple[int, int], image_shape: tuple[int, int]) -> int:
    """Image pixels one patch-grid cell covers."""
    return max(1, int(round(image_shape[0] / grid_shape[0] * image_shape[1] / grid_shape[1])))


def peak_component(mask: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Only the connected component (8-connectivity) of ``mask`` that holds its hottest pixel."""
    if not mask.any():
        return mask
    labels = label(mask, connectivity=2)
    hottest = np.unravel_index(np.argmax(np.where(mask, heat, -np.inf)), heat.shape)
    return labels == labels[hottest]


def defect_mask(heat: np.ndarray, threshold: float, min_area: int, peak_share: float | None = None) -> np.ndarray:
    """The proposed mask (bool, the heat map's shape).

    Args:
        heat: the pixel heat map at the image's size.
        threshold: the model's pixel threshold; nothing below it is marked.
        min_area: connected components under this many pixels are dropped (one patch's area).
        peak_share: for a class with drawn masks, also cut at this share of the image's peak and keep only
            the component around the peak; None: the threshold alone.

    Returns:
        ``heat >= level`` without specks.
    """
    heat = np.asarray(heat)
    level = threshold if peak_share is None else max(threshold, peak_share * float(heat.max()))
    mask = heat >= level
    if min_area > 1 and mask.any():
        mask = remove_small_objects(mask, max_size=min_area - 1, connectivity=2)  # drops sizes <= max_size
    return mask if peak_share is None else peak_component(mask, heat)


def iou(mask: np.ndarray, truth: np.ndarray) -> float:
    """|mask & truth| / |mask | truth| (1 when both are empty)."""
    union = np.logical_or(mask, truth).sum()
    return float(np.logical_and(mask, truth).sum() / union) if union else 1.0


def choose_peak_share(heats: Sequence[np.ndarray], truths: Sequence[np.ndarray], threshold: float,
                      min_areas: Sequence[int], shares: Sequence[float] = PEAK_SHARES) -> float:
    """The share of the peak whose masks fit the drawn ``truths`` best (mean IoU; the lower share on a tie).

    Args:
        heats: heat maps of a class's annotated images, each at its mask's size.
        truths: the masks inspectors drew on them.
        threshold: the model's pixel threshold (the floor of every level).
        min_areas: one patch's area in pixels, per image.
        shares: the shares tried.

    Returns:
        One of ``shares``.
    """
    fits = [np.mean([iou(defect_mask(h, threshold, a, s), t) for h, t, a in zip(heats, truths, min_areas, strict=True)])
            for s in shares]
    return float(shares[int(np.argmax(fits))])


def heatmap_mask(patch_map: np.ndarray, height: int, width: int, threshold: float,
                 config: DMADConfig | None = None, peak_share: float | None = None) -> np.ndarray:
    """The model's proposed defect mask at the image's size from a stored patch grid (Label Studio's
    pre-annotation, `dmad serve`'s RLE heat map).

    The grid is made into the same smoothed map the version's pixel threshold was calibrated on
    (``model.anomaly_map``), then ``defect_mask`` at one patch's area. The backbone sees the whole image
    resized, so the grid covers it all.

    Args:
        patch_map: the patch grid (gh, gw).
        height: the image's height in pixels.
        width: the image's width in pixels.
        threshold: the version's pixel threshold.
        config: the version's engine configuration (its sigma and input size); None: the defaults, for a
            version that records none.
        peak_share: the class's share of the image's peak (a class with drawn masks); None: the threshold alone.

    Returns:
        A bool mask (height, width).
    """
    from dmad_core.config import DMADConfig
    from dmad_core.model import anomaly_map  # the model imports this module: imported when called

    heat = anomaly_map(patch_map, (height, width), config or DMADConfig())
    return defect_mask(heat, threshold, patch_area(tuple(np.shape(patch_map)), (height, width)), peak_share)
