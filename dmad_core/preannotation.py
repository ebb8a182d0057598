"""The defect mask a model proposes for an image (Label Studio's pre-annotation and `dmad serve`'s RLE heat
map): its heat map above a level, without specks, and only the region around the image's hottest point, cut
at a share of that peak: for a class whose defects inspectors have drawn, the share that fits their masks;
for another, half the peak. Never below the class's own pixel threshold (``pixel_threshold_for``). For a
class whose drawn masks GrabCut fits better, the mask is then refined on the image's colours
(``grabcut_mask``, ``choose_grabcut``).

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
    threshold = pixel_threshold_for(state.pixel_thresholds, state.pixel_threshold, pred.item.category)
    mask = defect_mask(heat, threshold, area, share)
    if pred.item.category in state.mask_grabcut:
        mask = grabcut_mask(pred.item.load(), mask, area)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

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
GRABCUT_ITERATIONS = 3
GRABCUT_MAX_SIDE = 256


def peak_share_for(shares: Mapping[str, float], category: str) -> float:
    """The share of an image's peak that a class's proposed masks are cut at: the one chosen on its drawn
    masks (``choose_peak_share``, in ``shares``), else ``UNDRAWN_PEAK_SHARE``. Every place that proposes a
    mask (Label Studio's pre-annotation, ``dmad serve``'s RLE) reads it here, so they agree."""
    return float(shares.get(category, UNDRAWN_PEAK_SHARE))


def pixel_threshold_for(thresholds: Mapping[str, float], pooled: float | None, category: str) -> float | None:
    """The heat-map level below which nothing of a class is marked: its own (a quantile of its validation
    normals' pixel scores, ``FittedState.pixel_thresholds``), else the one over all classes (a version saved
    before thresholds were kept per class, or a class it does not know). Every place that proposes a mask
    reads it here."""
    own = thresholds.get(category)
    return float(own) if own is not None else pooled


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


def grabcut_mask(image: np.ndarray, mask: np.ndarray, min_area: int, iterations: int = GRABCUT_ITERATIONS,
                 max_side: int = GRABCUT_MAX_SIDE) -> np.ndarray:
    """``mask`` refined by the image's colours (OpenCV's GrabCut), for defects that stand out from their
    surface (a dark crack on a bright commutator) but that the heat map's 8-pixel cells and smoothing blur.

    GrabCut is seeded with the proposed mask as probable defect, a ring one patch wide around it as
    probable background and the rest as background, on the image shrunk to at most ``max_side`` pixels (its
    cost is the image's area; the heat map is no finer anyway). Why GrabCut: it is the well-kept
    colour-model segmentation in OpenCV; a learned pixel head would need more masks than a class has.

    Args:
        image: the image, RGB or gray uint8, at the mask's size.
        mask: the proposed mask (``defect_mask``).
        min_area: one patch's area in image pixels (``patch_area``): the ring is its side.
        iterations: GrabCut's iterations.
        max_side: the longer side GrabCut runs at.

    Returns:
        The refined mask (bool, ``mask``'s shape); ``mask`` itself where there is nothing to refine or GrabCut
        finds no defect.

    Example::

        refined = grabcut_mask(load_image(path), defect_mask(heat, t, area, share), area)
    """
    import cv2  # OpenCV: loaded when a mask is refined

    mask = np.asarray(mask, dtype=bool)
    if not mask.any() or mask.all():
        return mask
    h, w = mask.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img: np.ndarray = np.asarray(image, dtype=np.uint8)
    img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else np.ascontiguousarray(img[..., :3][..., ::-1])
    img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    small = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    if not small.any():
        return mask
    r = max(1, round(max(1, round(min_area ** 0.5)) * scale))  # one patch's side, in the shrunk image
    grown = cv2.dilate(small.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    seeds = np.full(small.shape, cv2.GC_BGD, np.uint8)
    seeds[grown.astype(bool)] = cv2.GC_PR_BGD
    seeds[small] = cv2.GC_PR_FGD
    if not (seeds == cv2.GC_BGD).any():
        return mask  # the proposal and its ring fill the image: no background to learn from
    try:
        cv2.grabCut(img, seeds, None, np.zeros((1, 65)), np.zeros((1, 65)), iterations,  # type: ignore[call-overload]
                    cv2.GC_INIT_WITH_MASK)  # (OpenCV's stubs want a rectangle even when a mask seeds it)
    except cv2.error:
        return mask
    out = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
    if not out.any():
        return mask
    return cv2.resize(out.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


def choose_grabcut(images: Sequence[np.ndarray], heats: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                   threshold: float, min_areas: Sequence[int], peak_share: float) -> bool:
    """Whether GrabCut (``grabcut_mask``) fits a class's drawn ``truths`` better than the heat map's own mask
    cut at ``peak_share`` (a higher mean IoU; a tie keeps the heat map's mask, as ``choose_peak_share`` takes
    the best mean). Measured (docs/method-notes.md), it doubles the fit where a defect's colour stands out
    and halves it where it does not (broken glass has the bottle's colours), so each class chooses on its
    inspectors' masks, never on test images.

    Args:
        images: the annotated images, each at its mask's size.
        heats: their heat maps, at the same size.
        truths: the masks inspectors drew.
        threshold: the model's pixel threshold.
        min_areas: one patch's area in pixels, per image.
        peak_share: the class's share of the peak (``choose_peak_share``).

    Returns:
        True where the refined masks fit the drawn ones better.
    """
    plain, refined = [], []
    for img, h, t, a in zip(images, heats, truths, min_areas, strict=True):
        m = defect_mask(h, threshold, a, peak_share)
        plain.append(iou(m, t))
        refined.append(iou(grabcut_mask(img, m, a), t))
    return bool(refined) and float(np.mean(refined)) > float(np.mean(plain))


def heatmap_mask(patch_map: np.ndarray, height: int, width: int, threshold: float,
                 config: DMADConfig | None = None, peak_share: float | None = None,
                 image: np.ndarray | None = None) -> np.ndarray:
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
        image: the image's pixels (height x width) for a class whose drawn masks chose GrabCut
            (``FittedState.mask_grabcut``): the mask is refined by ``grabcut_mask``; None: the heat map's mask.

    Returns:
        A bool mask (height, width).
    """
    from dmad_core.config import DMADConfig
    from dmad_core.model import anomaly_map  # the model imports this module: imported when called

    heat = anomaly_map(patch_map, (height, width), config or DMADConfig())
    area = patch_area(tuple(np.shape(patch_map)), (height, width))
    mask = defect_mask(heat, threshold, area, peak_share)
    if image is None or np.shape(image)[:2] != (height, width):
        return mask
    return grabcut_mask(image, mask, area)


def proposed_mask(levels: Mapping[str, Any], patch_map: np.ndarray, height: int, width: int, category: str,
                  config: DMADConfig | None, pixels: Callable[[], np.ndarray | None]) -> np.ndarray | None:
    """The mask proposed for one image of ``category``, from what its model recorded to propose masks
    (``FittedState.mask_levels``; a version's row holds the same keys): the class's own pixel threshold, its
    share of the peak, and GrabCut where its drawn masks chose it. Label Studio's tasks and ``dmad serve``'s
    RLE both call this, so they propose the same mask.

    Args:
        levels: ``pixel_threshold``, ``pixel_thresholds``, ``mask_peak_shares``, ``mask_grabcut`` (missing
            keys: a version saved before they existed).
        patch_map: the image's patch grid (gh, gw).
        height: the image's height in pixels.
        width: the image's width in pixels.
        category: its class.
        config: the version's engine configuration (None: the defaults).
        pixels: gives the image's pixels (None where unreadable); called only for a class that refines.

    Returns:
        A bool mask (height, width); None where the model records no pixel threshold.
    """
    threshold = pixel_threshold_for(levels.get("pixel_thresholds") or {}, levels.get("pixel_threshold"), category)
    if threshold is None:
        return None
    refine = category in (levels.get("mask_grabcut") or ())
    return heatmap_mask(patch_map, height, width, float(threshold), config,
                        peak_share_for(levels.get("mask_peak_shares") or {}, category), pixels() if refine else None)
