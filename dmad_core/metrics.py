"""Per-class evaluation metrics: image and pixel AUROC / AP / F1-max, and PRO (MVTec's AUPRO@0.3).

Image metrics come from scikit-learn. Pixel metrics use the same definitions computed from one sort
(scikit-learn needs several, which is slow for millions of pixels), and PRO is vectorised over thresholds
and regions (a histogram of each region's scores): a class of 120 maps of 256x256 takes about 2 s.

Example:
    >>> m = compute_class_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    >>> round(m.image_auroc, 2), m.pro is None
    (0.75, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from skimage.measure import label as label_regions
from sklearn.metrics import precision_recall_curve, roc_auc_score

METRIC_NAMES: tuple[str, ...] = (
    "image_auroc",
    "image_ap",
    "image_f1max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1max",
    "pro",
)


@dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one class, as fractions in [0, 1]; pixel metrics and PRO are None without masks."""

    image_auroc: float
    image_ap: float
    image_f1max: float
    pixel_auroc: float | None = None
    pixel_ap: float | None = None
    pixel_f1max: float | None = None
    pro: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        """Name -> value in METRIC_NAMES order (what the database and the UI store)."""
        return {name: getattr(self, name) for name in METRIC_NAMES}


def _binary_inputs(labels: ArrayLike, scores: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Flattened labels (bool) and scores, checked: same length, finite, both classes present."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{what}: {y.size} labels but {s.size} scores")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{what}: labels must be 0 (normal) or 1 (defective)")
    if not np.isfinite(s).all():
        raise ValueError(f"{what}: scores contain NaN or infinity")
    y = y.astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        present = "defective" if n_pos else "normal"
        raise ValueError(
            f"{what}: only {present} samples ({y.size}); AUROC and AP need both normal and defective ones"
        )
    return y, s


def _best_f1(precision: np.ndarray, recall: np.ndarray) -> float:
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def _pr_metrics(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """(AP, F1-max) from one precision-recall curve.

    AP is scikit-learn's step-wise definition (average_precision_score): sum of (R_n - R_{n-1}) * P_n.
    """
    precision, recall, _ = precision_recall_curve(y, s)
    ap = float(-np.sum(np.diff(recall) * precision[:-1]))
    return ap, _best_f1(precision, recall)


def f1_max(labels: ArrayLike, scores: ArrayLike) -> float:
    """Best F1 over all thresholds of the precision-recall curve."""
    y, s = _binary_inputs(labels, scores, "f1_max")
    return _pr_metrics(y, s)[1]


def _pixel_ranking_metrics(y: np.ndarray, s: np.ndarray) -> tuple[float, float, float]:
    """(AUROC, AP, F1-max) of millions of pixels from a single sort.

    The same definitions as scikit-learn's roc_auc_score, average_precision_score and the
    precision-recall curve (the unit tests check equality), but scikit-learn sorts and validates the
    inputs several times, which takes ~8 s instead of ~1 s for 120 maps of 256x256.
    """
    order = np.argsort(s)[::-1]
    s_sorted, y_sorted = s[order], y[order]
    # Last position of each run of equal scores: one curve point per distinct threshold.
    ends = np.append(np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1)
    tps = np.cumsum(y_sorted, dtype=np.int64)[ends]
    fps = ends + 1 - tps
    n_pos, n_neg = tps[-1], fps[-1]
    tpr = np.concatenate(([0.0], tps / n_pos))
    fpr = np.concatenate(([0.0], fps / n_neg))
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    precision = tps / (tps + fps)
    recall = tpr[1:]
    ap = float(np.sum(np.diff(tpr) * precision))  # sum of (R_n - R_{n-1}) * P_n, as _pr_metrics
    return auroc, ap, _best_f1(precision, recall)


def _check_masks_maps(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(masks)
    a = np.asarray(maps)
    if m.shape != a.shape:
        raise ValueError(f"masks {m.shape} and maps {a.shape} must have the same shape")
    if m.ndim != 3:
        raise ValueError(f"masks and maps must be [N, H, W], got {m.ndim} dimensions")
    if not np.isfinite(a).all():
        raise ValueError("maps contain NaN or infinity")
    return m > 0, a


def _threshold_bins(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Index of the highest threshold each value reaches (value >= thresholds[0..index]).

    The thresholds are evenly spaced, so the index is computed arithmetically and then corrected by
    one where rounding put it on the wrong side (np.searchsorted gives the same, several times slower).
    """
    last = thresholds.size - 1
    step = (thresholds[-1] - thresholds[0]) / last
    if step <= 0:  # constant maps: every value reaches every threshold
        return np.full(values.shape, last, dtype=np.int64)
    bins = np.clip(np.floor((values - thresholds[0]) / step), 0, last).astype(np.int64)
    bins -= values < thresholds[bins]
    bins += (bins < last) & (values >= thresholds[np.minimum(bins + 1, last)])
    return bins


def _positives_per_threshold(
    values: np.ndarray, groups: np.ndarray, n_groups: int, thresholds: np.ndarray
) -> np.ndarray:
    """[n_groups, n_thresholds] count of each group's values >= each (ascending) threshold.

    One histogram per group over threshold bins, then a reversed cumulative sum: linear in the number
    of pixels, with no loop over thresholds or regions.
    """
    n_thresholds = thresholds.size
    bins = _threshold_bins(values, thresholds)
    hist = np.bincount(groups * n_thresholds + bins, minlength=n_groups * n_thresholds)
    hist = hist.reshape(n_groups, n_thresholds)
    return np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]


def pro_curve(masks: ArrayLike, maps: ArrayLike, n_thresholds: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve: (fprs, pros) for thresholds from the maps' max down to their min.

    A pixel is predicted defective when its score is >= the threshold. PRO at a threshold is the mean,
    over every connected ground-truth region of every image (8-connectivity, as MVTec's own code), of the
    fraction of the region predicted defective; FPR is the fraction of all normal pixels predicted
    defective. Both arrays are non-decreasing.
    """
    gt, scores = _check_masks_maps(masks, maps)
    if n_thresholds < 2:
        raise ValueError(f"n_thresholds must be at least 2, got {n_thresholds}")
    if not gt.any():
        raise ValueError("PRO needs at least one defect pixel in the masks")
    if gt.all():
        raise ValueError("PRO needs normal pixels in the masks (the false-positive rate is undefined)")
    thresholds = np.linspace(scores.min(), scores.max(), n_thresholds)

    # Global region ids of the defect pixels, in the order of scores[gt] (image by image, row-major):
    # each image's labels are shifted so that regions of different images stay apart.
    ids_per_image = []
    n_regions = 0
    for i in range(gt.shape[0]):
        labelled, count = label_regions(gt[i], return_num=True)
        ids_per_image.append(labelled[gt[i]].astype(np.int64) - 1 + n_regions)
        n_regions += count
    defect_ids = np.concatenate(ids_per_image)
    region_pos = _positives_per_threshold(scores[gt], defect_ids, n_regions, thresholds)
    region_sizes = np.bincount(defect_ids, minlength=n_regions)
    pros = (region_pos / region_sizes[:, None]).mean(axis=0)
    normal = scores[~gt]
    normal_pos = _positives_per_threshold(normal, np.zeros(normal.size, dtype=np.int64), 1, thresholds)
    fprs = normal_pos[0] / normal.size
    return fprs[::-1], pros[::-1]  # highest threshold first: both non-decreasing


def aupro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3, n_thresholds: int = 200) -> float:
    """Area under the PRO curve from FPR 0 to ``fpr_limit``, divided by ``fpr_limit`` (a perfect map
    gives 1.0, a random one about ``fpr_limit / 2``).

    As in MVTec's evaluation, the curve is anchored at (0, 0) and (1, 1) and interpolated linearly at
    exactly ``fpr_limit``.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fprs, pros = pro_curve(masks, maps, n_thresholds)
    fprs = np.concatenate(([0.0], fprs, [1.0]))
    pros = np.concatenate(([0.0], pros, [1.0]))
    # First point beyond the limit (exists: the last fpr is 1.0 >= limit; if equal, take all points).
    end = int(np.searchsorted(fprs, fpr_limit, side="right"))
    if end >= fprs.size:
        xs, ys = fprs, pros
    else:
        x0, x1, y0, y1 = fprs[end - 1], fprs[end], pros[end - 1], pros[end]
        y_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)  # x1 > limit >= x0
        xs = np.append(fprs[:end], fpr_limit)
        ys = np.append(pros[:end], y_at_limit)
    area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2))  # trapezoid rule
    return area / fpr_limit


def compute_class_metrics(
    labels: ArrayLike,
    image_scores: ArrayLike,
    masks: ArrayLike | None = None,
    maps: ArrayLike | None = None,
) -> ClassMetrics:
    """All metrics of one class.

    ``labels``/``image_scores`` have one entry per image. ``masks`` (bool [N, H, W]) and ``maps`` (float,
    same shape) give the pixel metrics, over all pixels of all images; they are None when the class has
    no masks, or when the masks contain no defect pixel at all (nothing to localise).
    """
    y, s = _binary_inputs(labels, image_scores, "image metrics")
    image_ap, image_f1 = _pr_metrics(y, s)
    result = {"image_auroc": float(roc_auc_score(y, s)), "image_ap": image_ap, "image_f1max": image_f1}
    if masks is None:
        return ClassMetrics(**result)
    if maps is None:
        raise ValueError("masks were given without anomaly maps")
    gt, scores = _check_masks_maps(masks, maps)
    if gt.shape[0] != y.size:
        raise ValueError(f"{gt.shape[0]} masks but {y.size} image labels")
    if not gt.any():
        return ClassMetrics(**result)
    pixel_y, pixel_s = _binary_inputs(gt, scores, "pixel metrics")
    pixel_auroc, pixel_ap, pixel_f1 = _pixel_ranking_metrics(pixel_y, pixel_s)
    return ClassMetrics(
        **result,
        pixel_auroc=pixel_auroc,
        pixel_ap=pixel_ap,
        pixel_f1max=pixel_f1,
        pro=aupro(gt, scores),
    )


def mean_metrics(per_class: dict[str, ClassMetrics]) -> dict[str, float | None]:
    """Mean of each metric over the classes that have it; None where no class has it."""
    means: dict[str, float | None] = {}
    for name in METRIC_NAMES:
        values = [v for m in per_class.values() if (v := getattr(m, name)) is not None]
        means[name] = float(np.mean(values)) if values else None
    return means


@dataclass(frozen=True)
class PairedDifference:
    """``after - before`` of one metric on the same images, with a bootstrap interval (fractions)."""

    before: float
    after: float
    low: float  # the interval's lower end of the difference
    high: float  # ... and its upper end

    @property
    def delta(self) -> float:
        return self.after - self.before


def paired_auroc_difference(labels: ArrayLike, before: ArrayLike, after: ArrayLike, n_boot: int = 500,
                            level: float = 0.9, seed: int = 0) -> PairedDifference:
    """Image AUROC of two score sets of the same images, and a paired, stratified bootstrap interval of the
    difference: the images are resampled (normals and defects each with replacement, so every resample has
    both) and both scores are judged on the same resample, so the image-to-image variation the two versions
    share cancels out. Written here because scikit-learn has no paired bootstrap of a metric.

    Args:
        labels: 0 (normal) / 1 (defective) per image.
        before, after: the two versions' image scores, in the order of ``labels``.
        n_boot: bootstrap resamples.
        level: the interval's coverage (0.9: the 5th to the 95th percentile).
        seed: the resampling's seed (the same images give the same interval).

    Returns:
        The two AUROCs and the interval of their difference.

    Example:
        >>> d = paired_auroc_difference([0, 0, 1, 1], [0.1, 0.5, 0.4, 0.6], [0.1, 0.2, 0.4, 0.6])
        >>> round(d.before, 2), round(d.after, 2), round(d.delta, 2)
        (0.75, 1.0, 0.25)
    """
    y, b = _binary_inputs(labels, before, "image AUROC before")
    _, a = _binary_inputs(labels, after, "image AUROC after")
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        diffs[i] = roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx])
    tail = 100 * (1 - level) / 2
    return PairedDifference(float(roc_auc_score(y, b)), float(roc_auc_score(y, a)),
                            float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100 - tail)))
