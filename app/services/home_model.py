"""Scoring with a stored model version: the pool (stored as rows a UI ranks without running the model)
and single uploaded images (judged through the scoring contract, ``app/services/line/inference.py``). Features
come from the home's cache, so a known image never goes through the backbone again."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.orm import Session

from app.home_folder import Home
from app.services.line.inference import TOP_PATCHES, top_patches  # noqa: F401 (TOP_PATCHES: imported from here too)
from db.models import Image, ModelVersion
from db.repositories import PoolScoreRow
from dmad_core.config import DMADConfig
from dmad_core.fitted_state import saved_config
from dmad_core.model import DMAD, FeatureStore, ImageItem, Prediction

if TYPE_CHECKING:
    from app.services.line.inference import LoadedModel


def engine_config(home: Home) -> DMADConfig:
    """The engine configuration a home trains with: its preset, weights file and epoch settings."""
    settings = home.load_settings()
    config = DMADConfig.preset(settings.preset)
    if settings.weights_path:
        config = dataclasses.replace(config, backbone=dataclasses.replace(
            config.backbone, weights="file", weights_path=settings.weights_path))
    if settings.train_epochs:
        config = dataclasses.replace(config, mapper=dataclasses.replace(config.mapper, epochs=settings.train_epochs))
    if settings.scorer != config.score.scorer:
        config = dataclasses.replace(config, score=dataclasses.replace(config.score, scorer=settings.scorer))
        if settings.scorer == "mapper":  # the mapper batches whole images of one grid
            config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, geometry="square"))
    if settings.validation_fraction is not None:  # more held out: thresholds a lower false-alarm rate can check
        config = dataclasses.replace(config, mapper=dataclasses.replace(
            config.mapper, validation_fraction=settings.validation_fraction))
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


def pool_rows(images: Sequence[Image], predictions: Sequence[Prediction]) -> list[PoolScoreRow]:
    return [PoolScoreRow(image_id=img.id, score=float(p.image_score), patch_map=p.patch_scores,
                         top_patches=top_patches(p.patch_scores, img.width, img.height),
                         knn_score=p.knn_score, classifier_score=p.classifier_score)
            for img, p in zip(images, predictions, strict=True)]


def score_upload(home: Home, session: Session, version: ModelVersion, path: str | Path, category: str,
                 loaded: LoadedModel | None = None) -> dict[str, Any]:
    """Score one uploaded image file now (Inspect's upload) through the scoring contract, as `dmad predict`
    and `dmad serve` would: its score, the class's threshold in force and its OK/NG decision, the patch grid
    and top patches. ``loaded``: the worker's held model (a new one is loaded when absent).

    Returns:
        ``LineResult.record()`` with ``patch_map`` (the grid as lists) and ``version``.
    """
    from app.services.line.inference import LineImage, LoadedModel

    line = (loaded or LoadedModel()).line(home, session, version)
    line.check_category(category)
    [result] = line.score([LineImage.from_file(path, category)])
    return {**result.record(), "patch_map": result.patch_map.tolist(), "version": result.version}
