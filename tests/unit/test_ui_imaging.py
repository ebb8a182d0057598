"""The UI's pure image helpers and the diversity rule of the Review grid."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from app.home_folder import Home
from app.services import imaging
from app.ui.diversity import crops_for, iou, pick_patches
from app.ui.uploads import save_upload
from dmad_core.errors import UserError


def test_upsample_is_bilinear_to_the_image_size() -> None:
    grid = np.zeros((32, 32), dtype=np.float16)  # a model's grid: left half 0, right half 1
    grid[:, 16:] = 1.0
    field = imaging.upsample(grid, width=400, height=300)
    assert field.shape == (300, 400)
    assert field[:, 0].max() < 0.05 and field[:, -1].min() > 0.95
    assert 0.3 < field[150, 200] < 0.7  # smooth in between, not nearest-neighbour blocks
    assert np.all(np.diff(field[150]) >= -1e-6)


def test_heat_overlay_tints_only_scores_above_the_normal_level() -> None:
    rgb = np.full((32, 32, 3), 120, dtype=np.uint8)
    grid = np.zeros((4, 4), dtype=np.float32)
    grid[0, 0] = 1.0
    out = imaging.heat_overlay(rgb, grid, lo=0.0, hi=1.0, opacity=0.8)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.array_equal(out[-4:, -4:], rgb[-4:, -4:])  # ordinary region untouched
    assert not np.array_equal(out[0, 0], rgb[0, 0])  # hot corner tinted
    assert np.array_equal(imaging.heat_overlay(rgb, grid, 0.0, 1.0, opacity=0.0), rgb)


def test_normalise_uses_a_fixed_scale_and_survives_a_flat_range() -> None:
    assert imaging.normalise(np.array([0.5, 1.0, 2.0]), 1.0, 2.0).tolist() == [0.0, 0.0, 1.0]
    assert imaging.normalise(np.array([0.5, 1.0]), 1.0, 1.0).tolist() == [0.0, 1.0]


def test_context_box_grows_the_patch_and_stays_inside_the_image() -> None:
    assert imaging.context_box((0, 0, 10, 10), 100, 80, margin=0.5, min_side=32) == (0, 0, 32, 32)
    x0, y0, x1, y1 = imaging.context_box((90, 70, 100, 80), 100, 80, margin=0.5, min_side=32)
    assert (x1, y1) == (100, 80) and x1 - x0 == 32 and y1 - y0 == 32
    assert imaging.context_box((0, 0, 100, 80), 100, 80) == (0, 0, 100, 80)


def test_thumbnail_has_the_requested_size_and_outlines_the_patch() -> None:
    rgb = np.zeros((128, 96, 3), dtype=np.uint8)
    thumb = imaging.thumbnail(rgb, np.zeros((8, 6), np.float32), (40, 40, 56, 56), 0.0, 1.0, size=100)
    assert max(thumb.shape[:2]) == 100
    pixels = thumb.reshape(-1, 3).astype(int)
    assert ((pixels[:, 0] < 40) & (pixels[:, 1] > 200) & (pixels[:, 2] > 200)).any()  # the cyan outline
    assert imaging.to_jpeg(thumb)[:2] == b"\xff\xd8"


def test_mask_overlay_and_boxes_change_only_their_pixels() -> None:
    rgb = np.zeros((20, 20, 3), dtype=np.uint8)
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:8, 5:8] = True
    out = imaging.mask_overlay(rgb, mask)
    assert out[~mask].max() == 0 and out[mask].sum(axis=1).min() > 0
    boxed = imaging.draw_boxes(rgb, [(2, 2, 10, 10)])
    assert boxed[2, 2].tolist() == list(imaging.BOX_COLOUR) and boxed[15, 15].max() == 0


def test_iou() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_one_defect_does_not_fill_the_page() -> None:
    """Overlapping patches of one defect give one crop; a separate hot spot can give a second."""
    patches = [
        {"box": [10, 10, 30, 30], "score": 0.9},
        {"box": [12, 10, 32, 30], "score": 0.8},  # same defect, overlapping
        {"box": [15, 12, 35, 32], "score": 0.7},  # same defect
        {"box": [60, 60, 80, 80], "score": 0.6},  # elsewhere
    ]
    assert pick_patches(patches, 100, 100, per_image=1) == [((10, 10, 30, 30), 0.9)]
    touching = [{"box": [10, 10, 30, 30], "score": 0.9}, {"box": [28, 10, 48, 30], "score": 0.8},
                {"box": [30, 10, 50, 30], "score": 0.7}]  # overlaps by two pixels; then only touches
    assert [box for box, _ in pick_patches(touching, 100, 100, per_image=3)] == [(10, 10, 30, 30), (30, 10, 50, 30)]
    assert [box for box, _ in pick_patches(patches, 100, 100, per_image=3)] == [(10, 10, 30, 30), (60, 60, 80, 80)]
    crops = crops_for(7, patches, 100, 100, per_image=2)
    assert [(c.image_id, c.rank) for c in crops] == [(7, 0), (7, 1)]


def test_an_image_without_patches_is_shown_whole() -> None:
    assert pick_patches([], 64, 48) == [((0, 0, 64, 48), 0.0)]


def test_save_upload_writes_under_the_home_and_refuses_non_images(tmp_path: Path) -> None:
    home = Home.at(tmp_path / "home")
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    first = save_upload(home, "../../etc/part 1.png", buffer.getvalue())
    second = save_upload(home, "../../etc/part 1.png", buffer.getvalue())
    assert first.parent == home.uploads_dir and second != first
    assert first.name.endswith("-part_1.png")
    with pytest.raises(UserError, match="not a readable image") as refused:
        save_upload(home, "notes.txt", b"hello")
    # the message names the file and what to do, never PIL's in-memory buffer
    assert "notes.txt" in str(refused.value) and "PNG" in str(refused.value) and "BytesIO" not in str(refused.value)
