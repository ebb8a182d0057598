"""Scoring with a stored model version: the pool (stored as rows a UI ranks without running the model)
and single uploaded images. Features come from the home's cache, so a known image never goes through
the backbone again."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.home_folder import Home
from db.models import Image, ModelVersion
from db.repositories import PoolScoreRow
from dmad_core.config import DMADConfig
from dmad_core.data.readers import load_image
from dmad_core.errors import NotFound
from dmad_core.model import DMAD, FeatureStore, ImageItem, Prediction
from dmad_core.persistence import saved_config

TOP_PATCHES = 8


def engine_config(home: Home) -> DMADConfig:
    """The engine configuration a home trains with: its preset, weights file and epoch settings."""
    settings = home.load_settings()
    config = DMADConfig.preset(settings.preset)
    if settings.weights_path:
        config = dataclasses.replace(config, backbone=dataclasses.replace(
            config.backbone, weights="file", weights_path=settings.weights_path))
    if settings.train_epochs:
        config = dataclasses.replace(config, mapper=dataclasses.replace(config.mapper, epochs=settings.train_epochs))
    return config


def feature_store(home: Home, config: DMADConfig) -> FeatureStore:
    return FeatureStore(config, home.features_dir)


def load_model(home: Home, version: ModelVersion) -> DMAD:
    """A stored version, ready to predict (its own saved configuration, the home's feature cache)."""
    folder = Path(version.folder)
    return DMAD.load(folder, feature_store(home, saved_config(folder)))


def image_item(image: Image) -> ImageItem:
    """The engine's view of an image row: identity by content hash, so cached features are found."""
    return ImageItem(category=image.category.name, hash=image.content_hash, path=Path(image.path))


def top_patches(grid: np.ndarray, width: int, height: int, n: int = TOP_PATCHES) -> list[dict[str, Any]]:
    """The `n` highest-scoring patches as boxes in image pixels, best first.

    A patch is the 3x3-cell window around a grid cell (the neighbourhood its feature aggregates); cells
    next to an already chosen one are skipped, so one defect does not fill the list."""
    gh, gw = grid.shape
    taken = np.zeros_like(grid, dtype=bool)
    out: list[dict[str, Any]] = []
    for flat in np.argsort(grid, axis=None)[::-1]:
        i, j = divmod(int(flat), gw)
        if taken[i, j]:
            continue
        taken[max(0, i - 1):i + 2, max(0, j - 1):j + 2] = True
        box = [round(max(0, j - 1) * width / gw), round(max(0, i - 1) * height / gh),
               round(min(gw, j + 2) * width / gw), round(min(gh, i + 2) * height / gh)]
        out.append({"box": box, "score": float(grid[i, j])})
        if len(out) == n:
            break
    return out


def pool_rows(images: Sequence[Image], predictions: Sequence[Prediction]) -> list[PoolScoreRow]:
    return [PoolScoreRow(image_id=img.id, score=float(p.image_score), patch_map=p.patch_scores,
                         top_patches=top_patches(p.patch_scores, img.width, img.height))
            for img, p in zip(images, predictions, strict=True)]


def score_file(home: Home, version: ModelVersion, path: str | Path, category: str,
               model: DMAD | None = None) -> dict[str, Any]:
    """Score one image file now (an upload): its score, patch grid, top patches and how it compares
    with the version's image threshold (the highest score of a normal validation image). Pass `model`
    when the version is already in memory (a worker keeps the one it last used)."""
    model = model or load_model(home, version)
    if category not in model.categories_:
        raise NotFound(f"unknown category {category!r}; this model knows {', '.join(model.categories_)}")
    array = load_image(path)
    pred = model.predict([ImageItem.from_path(path, category)], progress_bar=False)[0]
    height, width = array.shape[:2]
    return {"score": pred.image_score, "patch_map": pred.patch_scores.tolist(),
            "top_patches": top_patches(pred.patch_scores, width, height),
            "image_threshold": model.image_threshold_, "version": version.name}
