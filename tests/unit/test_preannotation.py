"""The pre-annotation mask (dmad_core/preannotation.py): the heat map above the model's pixel threshold, without
specks smaller than one patch."""

from __future__ import annotations

import numpy as np

from dmad_core.preannotation import defect_mask, patch_area


def test_specks_smaller_than_a_patch_are_dropped_and_defects_kept():
    heat = np.zeros((64, 96), np.float32)
    heat[10:30, 20:50] = 2.0  # a defect: 600 px
    heat[0, 0:3] = 5.0  # a speck at the border: 3 px
    heat[50:52, 80:82] = 5.0  # a small blob: 4 px
    area = patch_area((8, 12), (64, 96))
    assert area == 64
    mask = defect_mask(heat, 1.0, area)
    assert mask[10:30, 20:50].all() and mask.sum() == 600
    assert defect_mask(heat, 1.0, 1).sum() == 600 + 3 + 4  # no clean-up
    assert not defect_mask(heat, 10.0, area).any()
    diagonal = np.eye(12, dtype=np.float32)  # 8-connected: a thin diagonal crack is one component
    assert defect_mask(diagonal, 0.5, 12).sum() == 12


def test_the_class_threshold_leaves_normal_parts_at_most_one_patch_marked():
    """Normal images whose heat maps all carry a bright blob of two patches (a highlight, say): the
    threshold must rise above the blob, where a fixed pixel quantile (99.9 %) would mark it on every one."""
    from benchmarks.preannotation import false_mark_threshold  # the candidate rule the benchmark measures

    rng = np.random.default_rng(0)
    heats = []
    for _ in range(5):
        h = rng.normal(0.0, 0.1, (64, 64)).astype(np.float32)
        h[20:28, 20:36] = 3.0  # 128 px = two 8 x 8 patches
        heats.append(h)
    t = false_mark_threshold(heats, patch_pixels=64)
    assert t > 3.0  # above the blob; a 99.9 % pixel quantile would sit on it (the blob is 3 % of pixels)
    assert all(defect_mask(h, t, 64).sum() <= 64 for h in heats)
    quiet = [rng.normal(0.0, 0.1, (64, 64)).astype(np.float32) for _ in range(5)]
    assert false_mark_threshold(quiet, 64) < 1.0  # nothing to avoid: a low threshold


def blob(shape: tuple[int, int], centre: tuple[int, int], height: float, width: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return height * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * width ** 2))


def test_a_relative_level_fits_defects_of_different_strength_where_one_threshold_cannot():
    """Two defects drawn as the region above 60 % of their own peak, one strong, one faint: the share
    chosen on them reproduces both masks, which no single threshold does."""
    from dmad_core.preannotation import PEAK_SHARES, choose_peak_share, iou

    heats = [blob((64, 64), (30, 30), 10.0, 6.0), blob((64, 64), (20, 40), 2.0, 6.0)]
    truths = [h >= 0.6 * h.max() for h in heats]
    share = choose_peak_share(heats, truths, threshold=0.5, min_areas=[4, 4])
    assert share in PEAK_SHARES and abs(share - 0.6) < 0.06
    assert all(iou(defect_mask(h, 0.5, 4, share), t) > 0.9 for h, t in zip(heats, truths))
    best_single = max(np.mean([iou(h >= c, t) for h, t in zip(heats, truths)]) for c in np.linspace(0.5, 10, 200))
    assert best_single < 0.8


def test_the_relative_level_keeps_only_the_region_around_the_peak():
    heat = blob((64, 96), (30, 20), 4.0, 5.0) + blob((64, 96), (30, 75), 3.5, 5.0)  # a second, weaker hot spot
    mask = defect_mask(heat, 0.5, 4, peak_share=0.5)
    assert mask[30, 20] and not mask[30, 75]
    assert defect_mask(heat, 0.5, 4)[30, 75]  # the threshold alone marks both
    assert not defect_mask(np.zeros((8, 8)), 0.5, 4, peak_share=0.5).any()


def test_a_class_without_drawn_masks_is_cut_at_half_its_peak_not_at_the_halo():
    """The unsupervised proposal: a smoothed defect of radius 5 over a low threshold. The threshold alone
    marks the blur's whole skirt; half the peak keeps about the defect's own extent."""
    from dmad_core.preannotation import UNDRAWN_PEAK_SHARE, iou, peak_share_for

    assert peak_share_for({"bottle": 0.45}, "bottle") == 0.45  # drawn masks chose it
    assert peak_share_for({"bottle": 0.45}, "tire") == UNDRAWN_PEAK_SHARE == 0.5
    yy, xx = np.mgrid[:64, :64]
    truth = (yy - 32) ** 2 + (xx - 32) ** 2 <= 5 ** 2
    heat = blob((64, 64), (32, 32), 4.0, 5.0)
    halo = defect_mask(heat, 0.2, 4)
    half = defect_mask(heat, 0.2, 4, peak_share_for({}, "tire"))
    assert halo.sum() > 2 * truth.sum() and iou(half, truth) > iou(halo, truth) + 0.2
    assert not defect_mask(heat, 5.0, 4, peak_share_for({}, "tire")).any()  # never below the threshold


def crack_image(rng: np.random.Generator, shape: tuple[int, int], rows: slice, cols: slice,
                crack: int, surface: int) -> tuple[np.ndarray, np.ndarray]:
    """A gray surface (value ``surface`` plus noise) with a thin crack (value ``crack``): image, true mask."""
    img = np.clip(rng.normal(surface, 6, shape), 0, 255).astype(np.uint8)
    truth = np.zeros(shape, bool)
    truth[rows, cols] = True
    img[truth] = crack
    return img, truth


def test_grabcut_tightens_a_blurred_proposal_to_a_crack_that_stands_out():
    """A dark 4-pixel crack on a bright surface, proposed as the smoothed heat map's wide blob: GrabCut on the
    image keeps the crack, and a class whose drawn masks look like this chooses it."""
    from dmad_core.preannotation import choose_grabcut, grabcut_mask, iou

    rng = np.random.default_rng(0)
    images, heats, truths = [], [], []
    for i in range(3):
        img, truth = crack_image(rng, (96, 128), slice(40 + i, 44 + i), slice(52, 78), crack=40, surface=200)
        images.append(img)
        truths.append(truth)
        heats.append(blob((96, 128), (42 + i, 65), 4.0, 12.0))
    proposed = defect_mask(heats[0], 0.2, 64, 0.5)
    refined = grabcut_mask(np.stack([images[0]] * 3, axis=-1), proposed, 64)  # RGB and gray alike; a ring of 8 px
    assert iou(refined, truths[0]) > iou(proposed, truths[0]) + 0.2
    assert choose_grabcut(images, heats, truths, threshold=0.2, min_areas=[64] * 3, peak_share=0.5)


def test_grabcut_is_not_chosen_where_the_defect_has_the_surface_s_colours():
    """A defect the model sees but the colours do not (same intensity as its surface): GrabCut cannot fit the
    drawn masks better, so the class keeps the heat map's mask; an empty proposal stays empty."""
    from dmad_core.preannotation import choose_grabcut, grabcut_mask

    rng = np.random.default_rng(1)
    images, heats, truths = [], [], []
    for i in range(3):
        img, truth = crack_image(rng, (96, 128), slice(30, 60), slice(40 + i, 80 + i), crack=128, surface=128)
        images.append(img)
        truths.append(truth)
        heats.append(blob((96, 128), (45, 60 + i), 4.0, 12.0))
    assert not choose_grabcut(images, heats, truths, threshold=0.2, min_areas=[64] * 3, peak_share=0.5)
    empty = np.zeros((96, 128), bool)
    assert not grabcut_mask(images[0], empty, 64).any()


def test_each_class_is_floored_by_its_own_pixel_threshold():
    """One class's heat maps on a larger scale (its map weight) must not lift the floor of another's: a
    class's own threshold is used where the model records one, the pooled one otherwise (older versions,
    unknown classes)."""
    from dmad_core.preannotation import pixel_threshold_for

    own = {"commutator": 9.0, "bottle": 0.4}
    assert pixel_threshold_for(own, 6.0, "bottle") == 0.4 and pixel_threshold_for(own, 6.0, "tire") == 6.0
    assert pixel_threshold_for({}, None, "bottle") is None
    heat = blob((64, 64), (32, 32), 4.0, 5.0)  # a bottle defect peaking at 4, under the pooled 6.0
    assert not defect_mask(heat, 6.0, 4, 0.5).any()
    assert defect_mask(heat, pixel_threshold_for(own, 6.0, "bottle"), 4, 0.5).any()
