"""The small values the model takes and gives: images, annotated defects, predictions, progress reports."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dmad_core.banks import source_id
from dmad_core.cache import content_hash
from dmad_core.data.readers import load_image

Progress = Callable[[float, str], None]  # (fraction 0..1, message): worker heartbeats, UI progress bars


def no_progress(fraction: float, message: str) -> None:
    """The default ``Progress``: reports nothing."""


@dataclass(frozen=True)
class ImageItem:
    """An image the model sees: its identity is the content hash of its file (or of its pixels)."""

    category: str
    hash: str
    path: Path | None = None
    array: np.ndarray | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def from_path(path: str | Path, category: str) -> ImageItem:
        return ImageItem(category=category, hash=content_hash(path), path=Path(path))

    @staticmethod
    def from_array(array: np.ndarray, category: str) -> ImageItem:
        return ImageItem(category=category, hash=hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(),
                         array=array)

    def load(self) -> np.ndarray:
        if self.array is not None:
            return self.array
        if self.path is None:
            raise ValueError(f"image item {self.hash} has neither an array nor a path")
        return load_image(self.path)

    def try_load(self) -> np.ndarray | None:
        """``load``, or None where the pixels cannot be had (the file is gone or unreadable, or neither an
        array nor a path): for work that can go on without them (GrabCut's refinement of a proposed mask)."""
        try:
            return self.load()
        except (OSError, ValueError):  # FileNotFoundError, CorruptImageError
            return None

    @property
    def source(self) -> int:
        return source_id(self.hash)


@dataclass(frozen=True)
class DefectAnnotation:
    """An annotated defect: ``mask`` (bool, the image's own size) or None for a defect without mask."""

    item: ImageItem
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class Prediction:
    """One image's patch score grid and image score; ``DMAD.anomaly_map`` turns the grid into a pixel map."""

    item: ImageItem
    patch_scores: np.ndarray  # (gh, gw) float32, higher = more anomalous
    image_score: float
    # the classifier scorer's two terms alone, each as an image score in its class's unit (top-k mean):
    # the kNN distance, and the class's defect classifier (None: no classifier, or the mapper scorer).
    # Review's "disagree" pick reads how far apart they are.
    knn_score: float | None = None
    classifier_score: float | None = None


def top_k_mean(grid: np.ndarray, k: int) -> float:
    """The image score: the mean of the ``k`` highest patch scores."""
    flat = np.sort(np.asarray(grid, np.float32).ravel())
    return float(flat[-min(k, len(flat)):].mean())


def normal_percentile(score: float, normal_scores: Sequence[float]) -> float | None:
    """The share of normal images (e.g. a class's validation images) that score below ``score``: 0-1, a
    unit an inspector reads as "more anomalous than this share of known-good parts". None without any.

    Example:
        >>> normal_percentile(2.0, [0.5, 1.0, 1.5, 3.0])
        0.75
    """
    if not len(normal_scores):
        return None
    return float(np.mean(np.asarray(normal_scores, np.float64) < score))


def class_rng(seed: int, category: str) -> np.random.Generator:
    """A random generator for one class's draws (validation split, classifier samples): seeded by the seed
    and the class's name, so a class gets the same draws whether it is trained alone or with others.

    Example:
        >>> float(class_rng(0, "tire").random()) == float(class_rng(0, "tire").random())
        True
    """
    return np.random.default_rng([seed, zlib.crc32(category.encode())])
