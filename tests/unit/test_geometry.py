"""Geometry that keeps small defects (``BackboneConfig.geometry``): with "aspect" an image keeps its
proportions (shorter side to the configured size), its patch grid follows them, and every heat map maps
back onto the image's own pixels. Offline backbone, synthetic images stretched to 5:2."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from dmad_core.config import BackboneConfig, DMADConfig
from dmad_core.data import make_synthetic_category, read_category
from dmad_core.evaluation import class_metrics
from dmad_core.model import DMAD, FeatureStore, ImageItem


def aspect_config() -> DMADConfig:
    cfg = DMADConfig.preset("offline")
    return dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, geometry="aspect"))


def test_input_size_keeps_proportions_in_multiples_of_the_deepest_stride():
    square = BackboneConfig(image_size=256)
    aspect = dataclasses.replace(square, geometry="aspect")
    assert square.input_size(202, 512) == (256, 256) and aspect.input_size(300, 300) == (256, 256)
    h, w = aspect.input_size(202, 512)  # KolektorSDD's proportions
    assert h == 256 and w % 16 == 0 and abs(w / h - 512 / 202) < 16 / 256
    assert aspect.input_size(512, 202) == (w, h)
    assert aspect.input_size(100, 2000) == (256, 4 * 256)  # capped at max_aspect
    assert square.stride == 8 and aspect.cache_key() != square.cache_key()
    # square configs keep the cache key they had before the field existed
    assert dataclasses.replace(square, geometry="square").cache_key() == square.cache_key()


def stretched_category(root: Path, name: str, texture: str, seed: int, size: tuple[int, int]) -> Path:
    """A synthetic category whose images and masks are resized to ``size`` (width, height)."""
    folder = make_synthetic_category(root, name, texture=texture, n_train=10, n_test_good=3, n_test_defect=5,
                                     seed=seed)
    for path in folder.rglob("*.png"):
        with PIL.Image.open(path) as im:
            resample = PIL.Image.NEAREST if "ground_truth" in path.parts else PIL.Image.BILINEAR
            im.resize(size, resample).save(path)
    return folder


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("geometry")
    roots = [stretched_category(tmp / "data", "strip", "grid", 0, (320, 128)),
             stretched_category(tmp / "data", "tile", "dots", 1, (128, 128))]
    cfg = aspect_config()
    store = FeatureStore(cfg, tmp / "features")
    dss = [read_category(r) for r in roots]
    model = DMAD(cfg, store).fit([ImageItem.from_path(r.path, d.name) for d in dss for r in d.train], [])
    return model, dss


def test_each_image_gets_the_grid_of_its_proportions_and_its_own_heat_map(wide):
    model, (strip, tile) = wide
    preds = model.predict([ImageItem.from_path(strip.test[0].path, "strip"),
                           ImageItem.from_path(tile.test[0].path, "tile")], progress_bar=False)
    gh, gw = preds[0].patch_scores.shape
    assert gh == 32 and gw == model.config.backbone.input_size(128, 320)[1] // 8  # 5:2 kept
    assert preds[1].patch_scores.shape == (32, 32)
    assert model.anomaly_map(preds[0].patch_scores, (128, 320)).shape == (128, 320)
    assert model.anomaly_map(preds[0].patch_scores).shape == (gh * 8, gw * 8)  # the input resolution
    assert model.fitted().pixel_threshold is not None and np.isfinite(model.fitted().pixel_threshold)


def test_metrics_of_a_class_with_wide_images(wide):
    model, (strip, _) = wide
    items = [ImageItem.from_path(r.path, "strip") for r in strip.test]
    m = class_metrics(strip.test, model.predict(items, progress_bar=False), model)
    assert m.pixel_auroc is not None and m.pixel_auroc > 0.5 and m.image_auroc > 0.5


def test_the_mapper_refuses_a_geometry_it_cannot_batch():
    cfg = aspect_config()
    cfg = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, scorer="mapper"))
    with pytest.raises(ValueError, match="square geometry"):
        DMAD(cfg, FeatureStore(cfg, Path("/nonexistent-never-written")))
