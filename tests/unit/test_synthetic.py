"""Synthetic categories: deterministic, read back by the MVTec AD reader, with exact and visible defects."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from dmad_core.data import (
    DEFECT_TYPES,
    DEMO_HARD_CATEGORY,
    SUBTLE_DEFECT_TYPES,
    TEXTURES,
    add_defect,
    load_image,
    load_mask,
    make_demo_dataset,
    make_normal_image,
    make_outlier_textures,
    make_synthetic_category,
    read_category,
)
from dmad_core.data.synthetic import DefectType


def _arrays(root: Path) -> list[np.ndarray]:
    """All images and masks of a category, in path order."""
    return [load_image(p) for p in sorted(root.rglob("*.png"))]


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = make_synthetic_category(tmp_path / "a", "cat", n_train=3, n_test_good=1, n_test_defect=3, size=48, seed=7)
    b = make_synthetic_category(tmp_path / "b", "cat", n_train=3, n_test_good=1, n_test_defect=3, size=48, seed=7)
    c = make_synthetic_category(tmp_path / "c", "cat", n_train=3, n_test_good=1, n_test_defect=3, size=48, seed=8)
    arrays_a, arrays_b, arrays_c = _arrays(a), _arrays(b), _arrays(c)
    assert len(arrays_a) == 3 + 1 + 3 + 3  # images + masks
    assert all(np.array_equal(x, y) for x, y in zip(arrays_a, arrays_b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(arrays_a, arrays_c, strict=True))


def test_reads_back_as_mvtec_ad(tmp_path: Path) -> None:
    root = make_synthetic_category(tmp_path, "tiles", size=64, texture="dots")
    assert root == tmp_path / "tiles"
    ds = read_category(root)
    assert (ds.name, ds.layout, ds.skipped) == ("tiles", "mvtec_ad", [])
    assert (len(ds.train), len(ds.test)) == (20, 16)
    assert set(ds.defect_types) == {"good", *DEFECT_TYPES}
    defects = [r for r in ds.test if r.label == 1]
    assert len(defects) == 10 and sum(r.label == 0 for r in ds.test) == 6
    assert {r.defect_type for r in defects} == set(DEFECT_TYPES)
    assert all(r.mask_path is not None for r in defects)
    assert all(r.mask_path is None for r in ds.test if r.label == 0)
    for record in defects:
        image, mask = load_image(record.path), load_mask(record.mask_path)  # type: ignore[arg-type]
        assert mask.shape == image.shape[:2] == (64, 64)
        assert 0.01 <= mask.mean() <= 0.05, f"{record.path.name}: defect covers {mask.mean():.3f}"


def test_normal_images_vary_but_keep_their_texture(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for texture in TEXTURES:
        a, b = make_normal_image(texture, 64, rng), make_normal_image(texture, 64, rng)
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
        assert not np.array_equal(a, b)
        # Same texture: similar mean colour (brightness varies by a few percent only).
        assert np.abs(a.mean(axis=(0, 1)) - b.mean(axis=(0, 1))).max() < 25


def test_textures_look_clearly_different() -> None:
    rng = np.random.default_rng(1)
    means = {t: make_normal_image(t, 64, rng).reshape(-1, 3).mean(axis=0) for t in TEXTURES}
    for t1, t2 in itertools.combinations(TEXTURES, 2):
        assert np.abs(means[t1] - means[t2]).sum() > 40, f"{t1} and {t2} have similar colours"


@pytest.mark.parametrize("texture", TEXTURES)
@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_defects_change_exactly_the_masked_pixels(texture: str, kind: DefectType) -> None:
    rng = np.random.default_rng(2)
    normal = make_normal_image(texture, 96, rng)
    image, mask = add_defect(normal, kind, rng)
    assert mask.dtype == bool and mask.shape == (96, 96)
    assert 0.01 <= mask.mean() <= 0.05
    np.testing.assert_array_equal(image[~mask], normal[~mask])
    change = np.abs(image.astype(int) - normal.astype(int))[mask].mean()
    assert change > 40, f"{kind} on {texture} changes the masked pixels by only {change:.1f} grey levels"


@pytest.mark.parametrize("texture", TEXTURES)
def test_a_tint_is_faint_but_real(texture: str) -> None:
    """The demo's hard defect: every masked pixel changes, by a few grey levels only (a discolouration that
    looks like normal variation), and nothing outside the mask changes."""
    rng = np.random.default_rng(2)
    normal = make_normal_image(texture, 96, rng)
    image, mask = add_defect(normal, "tint", rng)
    assert 0.01 <= mask.mean() <= 0.05
    np.testing.assert_array_equal(image[~mask], normal[~mask])
    change = np.abs(image.astype(int) - normal.astype(int))[mask].mean()
    assert 3 < change < 20, f"a tint on {texture} changes the masked pixels by {change:.1f} grey levels"


def test_uneven_light_varies_brightness_across_the_image_not_its_hue() -> None:
    """The demo's hard class is lit unevenly, so that brightness varies far more within an image than the
    tint does; the light changes every channel by the same factor, so it never looks like a tint."""
    even = make_normal_image("stripes", 96, np.random.default_rng(5))
    uneven = make_normal_image("stripes", 96, np.random.default_rng(5), illumination=0.10)
    ratio = uneven.astype(float) / np.maximum(even.astype(float), 1.0)
    blocks = [ratio[y:y + 24, x:x + 24].mean() for y in range(0, 96, 24) for x in range(0, 96, 24)]
    assert max(blocks) - min(blocks) > 0.1  # brighter and darker blotches
    lit = (even[..., 0] > 60) & (even[..., 2] > 20)  # the ratio is meaningful away from clipping and zeros
    r, b = ratio[..., 0][lit], ratio[..., 2][lit]
    assert np.abs(np.median(r - b)) < 0.05  # the same factor on red and blue: no colour cast


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown texture"):
        make_synthetic_category(tmp_path, "x", texture="marble")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown defect type"):
        add_defect(np.zeros((32, 32, 3), dtype=np.uint8), "dent", np.random.default_rng(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown defect types"):
        make_synthetic_category(tmp_path, "y", defect_types=("dent",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="illumination must be between 0 and 0.5"):
        make_synthetic_category(tmp_path, "z", illumination=2.0)


def test_existing_category_is_not_overwritten_by_accident(tmp_path: Path) -> None:
    kwargs = {"n_train": 4, "n_test_good": 1, "n_test_defect": 2, "size": 32}
    make_synthetic_category(tmp_path, "x", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_synthetic_category(tmp_path, "x", **kwargs)  # type: ignore[arg-type]
    kwargs["n_train"] = 2
    make_synthetic_category(tmp_path, "x", overwrite=True, **kwargs)  # type: ignore[arg-type]
    assert len(read_category(tmp_path / "x").train) == 2  # no stale files from the first run


def test_outlier_textures() -> None:
    textures = make_outlier_textures(8, size=48, seed=3)
    assert len(textures) == 8
    assert all(t.shape == (48, 48, 3) and t.dtype == np.uint8 for t in textures)
    again = make_outlier_textures(8, size=48, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(textures, again, strict=True))
    assert not np.array_equal(textures[0], make_outlier_textures(1, size=48, seed=4)[0])
    assert all(t.std() > 5 for t in textures)  # textures, not flat colours
    assert len({t.tobytes() for t in textures}) == 8


def test_demo_dataset_is_multi_class_and_supports_its_false_alarm_rate(tmp_path: Path) -> None:
    from app.services.line.decisions import normals_needed
    from dmad_core.config import DMADConfig
    from dmad_core.data.synthetic import DEMO_FALSE_ALARM_RATE, DEMO_TRAIN_NORMALS, DEMO_VALIDATION_FRACTION
    from dmad_core.training import split_validation

    roots = make_demo_dataset(tmp_path)
    assert len(roots) == 4 and len({r.name for r in roots}) == 4
    datasets = [read_category(r) for r in roots]
    assert all(ds.has_masks and len(ds.train) == DEMO_TRAIN_NORMALS for ds in datasets)
    # the validation normals the demo holds out per class can check its own false-alarm rate (1/(n+1) <= rate)
    _train, held_out = split_validation(datasets[0].train, DEMO_VALIDATION_FRACTION, DMADConfig().mapper.seed)
    assert len(held_out) >= normals_needed(DEMO_FALSE_ALARM_RATE)
    hard = next(ds for ds in datasets if ds.name == DEMO_HARD_CATEGORY)
    assert set(hard.defect_types) == {"good", *SUBTLE_DEFECT_TYPES}  # the hard class has tints only
    mean_colours = [load_image(ds.train[0].path).reshape(-1, 3).mean(axis=0) for ds in datasets]
    for m1, m2 in itertools.combinations(mean_colours, 2):
        assert np.abs(m1 - m2).sum() > 40
