"""Metrics against hand-computed cases, limiting cases (perfect / inverted / random maps) and errors."""

from __future__ import annotations


import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from dmad_core.metrics import (
    METRIC_NAMES,
    ClassMetrics,
    aupro,
    compute_class_metrics,
    f1_max,
    mean_metrics,
    pro_curve,
)

# --------------------------------------------------------------------------------------------------
# Image level, by hand


def test_image_metrics_hand_computed() -> None:
    # labels 0 0 1 1, scores 0.1 0.4 0.35 0.8
    # AUROC: pairs (pos, neg) ranked correctly: 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4
    # AP: descending 0.8(P) 0.4(N) 0.35(P) 0.1(N): recall steps of 0.5 at precision 1 and 2/3
    #     -> 0.5 * 1 + 0.5 * 2/3 = 0.8333
    # F1: at >=0.8 P=1 R=.5 F1=2/3; at >=0.35 P=2/3 R=1 F1=0.8; at >=0.1 P=.5 R=1 F1=2/3 -> 0.8
    m = compute_class_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert m.image_auroc == pytest.approx(0.75)
    assert m.image_ap == pytest.approx(5 / 6)
    assert m.image_f1max == pytest.approx(0.8)
    assert (m.pixel_auroc, m.pixel_ap, m.pixel_f1max, m.pro) == (None, None, None, None)


def test_f1_max_hand_computed() -> None:
    # labels 1 0 1 0 1 by descending score 0.9 0.8 0.7 0.6 0.2:
    # >=0.9: P=1 R=1/3 F1=.5 | >=0.8: P=.5 R=1/3 F1=.4 | >=0.7: P=2/3 R=2/3 F1=2/3
    # >=0.6: P=.5 R=2/3 F1=.571 | >=0.2: P=.6 R=1 F1=.75 -> 0.75
    assert f1_max([1, 0, 1, 0, 1], [0.9, 0.8, 0.7, 0.6, 0.2]) == pytest.approx(0.75)


def test_single_image_class_is_an_error() -> None:
    with pytest.raises(ValueError, match="both normal and defective"):
        compute_class_metrics(np.array([1, 1, 1]), np.array([0.2, 0.5, 0.9]))
    with pytest.raises(ValueError, match="both normal and defective"):
        compute_class_metrics(np.array([0, 0]), np.array([0.2, 0.5]))


def test_label_score_length_mismatch() -> None:
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        compute_class_metrics(np.array([0, 1, 1]), np.array([0.2, 0.5]))


# --------------------------------------------------------------------------------------------------
# PRO, by hand


def test_pro_curve_and_aupro_hand_computed() -> None:
    # One 1x5 image: region = pixels 0-1, normal = pixels 2-4. Thresholds (3): 0, 0.5, 1; positive: >=.
    # t=1:   region 1/2 covered, normal pixels {0, .5, 1}: 1/3 positive -> (FPR 1/3, PRO 0.5)
    # t=0.5: region 2/2,         normal 2/3                            -> (2/3, 1)
    # t=0:   everything                                                -> (1, 1)
    masks = np.array([[[1, 1, 0, 0, 0]]], dtype=bool)
    maps = np.array([[[1.0, 0.5, 0.0, 0.5, 1.0]]])
    fprs, pros = pro_curve(masks, maps, n_thresholds=3)
    np.testing.assert_allclose(fprs, [1 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(pros, [0.5, 1.0, 1.0])
    # With (0, 0) prepended: at FPR 0.3 the segment (0,0)-(1/3,0.5) gives PRO 0.45;
    # area = 0.3 * 0.45 / 2 = 0.0675, normalised by 0.3 -> 0.225.
    assert aupro(masks, maps, fpr_limit=0.3, n_thresholds=3) == pytest.approx(0.225)
    # Whole curve: 1/3 * 0.25 + 1/3 * 0.75 + 1/3 * 1 = 2/3.
    assert aupro(masks, maps, fpr_limit=1.0, n_thresholds=3) == pytest.approx(2 / 3)


def _two_regions() -> np.ndarray:
    """One 6x10 mask with region A (2x2 = 4 px) and region B (2x4 = 8 px), apart."""
    masks = np.zeros((1, 6, 10), dtype=bool)
    masks[0, 1:3, 1:3] = True  # A
    masks[0, 1:3, 5:9] = True  # B
    return masks


def test_pro_two_regions_of_different_size_half_covered() -> None:
    # A's left column (2 of 4 px) and B's two left columns (4 of 8 px) score 1, all else 0.
    # Thresholds (2): 0 and 1. At t=1: FPR 0, PRO = mean(0.5, 0.5) = 0.5. At t=0: (1, 1).
    # Curve (0,0) (0,0.5) (1,1) (1,1): at FPR 0.3, PRO = 0.5 + 0.5 * 0.3 = 0.65;
    # area = 0.3 * (0.5 + 0.65) / 2 = 0.1725 -> / 0.3 = 0.575.
    masks = _two_regions()
    maps = np.zeros(masks.shape)
    maps[0, 1:3, 1] = 1.0
    maps[0, 1:3, 5:7] = 1.0
    fprs, pros = pro_curve(masks, maps, n_thresholds=2)
    np.testing.assert_allclose(fprs, [0.0, 1.0])
    np.testing.assert_allclose(pros, [0.5, 1.0])
    assert aupro(masks, maps, n_thresholds=2) == pytest.approx(0.575)


def test_pro_averages_regions_not_pixels() -> None:
    # A fully covered (4/4), B 1 of 8: region mean (1 + 1/8) / 2 = 0.5625 (pixel-weighted would be 5/12).
    # aupro = p + (1 - p) * 0.3 / 2 = 0.5625 + 0.4375 * 0.15 = 0.628125.
    masks = _two_regions()
    maps = np.zeros(masks.shape)
    maps[0, 1:3, 1:3] = 1.0
    maps[0, 1, 5] = 1.0
    _, pros = pro_curve(masks, maps, n_thresholds=2)
    assert pros[0] == pytest.approx(0.5625)
    assert aupro(masks, maps, n_thresholds=2) == pytest.approx(0.628125)


def test_pro_regions_are_8_connected() -> None:
    # (0,0) touches (1,1) only diagonally; (1,1)-(1,2) are 4-neighbours. 8-connectivity: one region of 3,
    # 1/3 covered when only (0,0) scores. (4-connectivity would give two regions: (1 + 0) / 2 = 0.5.)
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.zeros(masks.shape)
    maps[0, 0, 0] = 1.0
    _, pros = pro_curve(masks, maps, n_thresholds=2)
    assert pros[0] == pytest.approx(1 / 3)


def test_pro_regions_of_different_images_stay_apart() -> None:
    # The same region position in two images: two regions, one fully covered, one not -> 0.5.
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[:, 1:3, 1:3] = True
    maps = np.zeros(masks.shape)
    maps[0, 1:3, 1:3] = 1.0
    _, pros = pro_curve(masks, maps, n_thresholds=2)
    assert pros[0] == pytest.approx(0.5)


def _random_masks(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n // 2):  # half the images defective, with one or two rectangles
        for _ in range(int(rng.integers(1, 3))):
            y, x = rng.integers(0, size - 12, size=2)
            h, w = rng.integers(3, 12, size=2)
            masks[i, y : y + h, x : x + w] = True
    return masks


def test_pro_perfect_inverted_random() -> None:
    rng = np.random.default_rng(0)
    masks = _random_masks(rng, 20, 64)
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, 1.0 - masks) == pytest.approx(0.0, abs=1e-9)
    # A random map has PRO ~ FPR, so the normalised area up to 0.3 is about 0.3 / 2.
    assert aupro(masks, rng.random(masks.shape)) == pytest.approx(0.15, abs=0.02)
    # A constant map is as good as random (the curve is the diagonal).
    assert aupro(masks, np.zeros(masks.shape)) == pytest.approx(0.15)


def test_pro_errors() -> None:
    masks = _two_regions()
    with pytest.raises(ValueError, match="same shape"):
        aupro(masks, np.zeros((1, 6, 9)))
    with pytest.raises(ValueError, match="at least one defect pixel"):
        aupro(np.zeros((1, 4, 4), dtype=bool), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, np.zeros(masks.shape), fpr_limit=0.0)
    with pytest.raises(ValueError, match="NaN"):
        aupro(masks, np.full(masks.shape, np.nan))


def test_pro_on_a_full_test_set() -> None:
    # A test set's worth of maps (120 of 256x256) in one call; its speed is measured by benchmarks, not here
    # (a timed assertion fails on a busy machine without saying anything about the code).
    rng = np.random.default_rng(1)
    masks = _random_masks(rng, 120, 256)
    maps = rng.random(masks.shape, dtype=np.float32) + masks * 0.5
    value = aupro(masks, maps)
    assert 0.3 < value < 1.0


# --------------------------------------------------------------------------------------------------
# compute_class_metrics with pixels


def test_pixel_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(2)
    masks = _random_masks(rng, 10, 32)
    # Rounded scores: many ties, which is where curve implementations usually disagree.
    maps = np.round(rng.random(masks.shape) + masks * 0.4, 1)
    labels = masks.any(axis=(1, 2)).astype(int)
    m = compute_class_metrics(labels, maps.max(axis=(1, 2)), masks, maps)
    assert m.pixel_auroc == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert m.pixel_ap == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert m.pixel_f1max == pytest.approx(f1_max(masks.ravel(), maps.ravel()), abs=1e-12)
    assert m.pro == pytest.approx(aupro(masks, maps))
    assert m.image_ap == pytest.approx(average_precision_score(labels, maps.max(axis=(1, 2))))


def test_perfect_maps_give_perfect_metrics() -> None:
    masks = _random_masks(np.random.default_rng(3), 8, 32)
    labels = masks.any(axis=(1, 2)).astype(int)
    m = compute_class_metrics(labels, labels.astype(float), masks, masks.astype(float))
    assert all(v == pytest.approx(1.0) for v in m.to_dict().values())


def test_no_masks_gives_none() -> None:
    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.1, 0.9, 0.2, 0.7])
    maps = np.zeros((4, 8, 8))
    assert compute_class_metrics(labels, scores).pixel_auroc is None
    assert compute_class_metrics(labels, scores, maps=maps).pro is None  # maps but no ground truth
    # Masks that are all zero (e.g. defects without pixel annotations): nothing to localise.
    m = compute_class_metrics(labels, scores, np.zeros((4, 8, 8), dtype=bool), maps)
    assert (m.pixel_auroc, m.pixel_ap, m.pixel_f1max, m.pro) == (None, None, None, None)
    assert m.image_auroc == pytest.approx(1.0)


def test_pixel_shape_errors() -> None:
    labels = np.array([0, 1])
    scores = np.array([0.1, 0.9])
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[1, 2:4, 2:4] = True
    with pytest.raises(ValueError, match="same shape"):
        compute_class_metrics(labels, scores, masks, np.zeros((2, 8, 7)))
    with pytest.raises(ValueError, match="2 masks but 3 image labels"):
        compute_class_metrics(np.array([0, 1, 1]), np.array([0.1, 0.9, 0.8]), masks, np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="without anomaly maps"):
        compute_class_metrics(labels, scores, masks, None)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        compute_class_metrics(labels, scores, masks[0], np.zeros((8, 8)))


# --------------------------------------------------------------------------------------------------
# Aggregation


def test_to_dict_and_mean_metrics() -> None:
    a = ClassMetrics(0.9, 0.8, 0.7, 0.95, 0.5, 0.6, 0.85)
    b = ClassMetrics(0.7, 0.6, 0.5)
    assert tuple(a.to_dict()) == METRIC_NAMES
    means = mean_metrics({"a": a, "b": b})
    assert means["image_auroc"] == pytest.approx(0.8)
    assert means["image_f1max"] == pytest.approx(0.6)
    assert means["pixel_auroc"] == pytest.approx(0.95)  # only the class that has it
    assert means["pro"] == pytest.approx(0.85)
    no_pixels = mean_metrics({"b": b})
    assert no_pixels["pro"] is None and no_pixels["pixel_ap"] is None
    assert mean_metrics({}) == dict.fromkeys(METRIC_NAMES)
