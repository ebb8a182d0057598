"""Scoring new images on the line: a model version with its per-class OK/NG thresholds, shared by
`dmad predict` and `dmad serve`.

A ``LineModel`` is loaded once and then scores batches of decoded images: image score, the class's
threshold and decision, top patches and the patch grid for a heat map. It never changes after loading,
so a request that started on one version finishes on it while a newer one is being loaded beside it.

Example::

    line = LineModel.load(home, sessions)            # the active version
    [result] = line.score([LineImage.from_file("part.png", "bottle")])
    result.decision                                  # "OK" or "NG"
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from app.home_folder import Home
from app.services import versions
from app.services.decisions import ClassThreshold, class_thresholds, threshold_for
from app.services.scoring import load_model, top_patches
from db.models import ModelVersion
from dmad_core.data.readers import CorruptImageError, ImageTooLarge, decode_image
from dmad_core.decision import decide
from dmad_core.errors import Invalid, TooLarge
from dmad_core.items import ImageItem
from dmad_core.model import DMAD

MAX_PIXELS = 60_000_000  # a 50-megapixel line camera fits; a decompression bomb does not
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def find_images(specs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files named by ``specs``: files, folders (searched recursively for image suffixes) and
    glob patterns (for a shell that did not expand them). Returns (files in order, each once;
    (spec, reason) for specs that name nothing)."""
    found: dict[Path, None] = {}
    problems: list[tuple[str, str]] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if any(ch in spec for ch in "*?[") and not path.exists():
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                problems.append((spec, "the pattern matches no file"))
            found.update(dict.fromkeys(m.resolve() for m in files))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                problems.append((spec, f"no image file ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder"))
            found.update(dict.fromkeys(p.resolve() for p in files))
        elif path.is_file():
            found[path.resolve()] = None
        else:
            problems.append((spec, "no such file or folder"))
    return list(found), problems


def category_from_path(path: Path, categories: Sequence[str]) -> str | None:
    """The class of a file from its folders: the nearest parent folder named like a class the model
    knows (``bottle/test/broken_large/000.png`` is a bottle); None when none is."""
    known = set(categories)
    return next((parent.name for parent in path.parents if parent.name in known), None)


@dataclass(frozen=True)
class LineImage:
    """An image to score: its pixels, its class, the sha256 of its file bytes (its identity in the image
    store) and where it came from (a path, or a name given by a client)."""

    array: np.ndarray = field(repr=False)
    category: str
    content_hash: str
    source: str
    data: bytes | None = field(default=None, repr=False)  # the file's bytes, kept when it joins the pool

    @staticmethod
    def from_bytes(data: bytes, category: str, source: str = "upload", max_pixels: int = MAX_PIXELS,
                   keep_bytes: bool = False) -> LineImage:
        """Decode an image file's bytes; Invalid (with the reason) for bytes that are no usable image."""
        if not data:
            raise Invalid(f"{source}: empty file")
        try:
            array = decode_image(data, source, max_pixels)
        except ImageTooLarge as exc:
            raise TooLarge(str(exc)) from exc
        except CorruptImageError as exc:
            raise Invalid(str(exc)) from exc
        return LineImage(array, category, hashlib.sha256(data).hexdigest(), source, data if keep_bytes else None)

    @staticmethod
    def from_file(path: str | Path, category: str, max_pixels: int = MAX_PIXELS, keep_bytes: bool = False) -> LineImage:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise Invalid(f"{path}: cannot read ({exc.strerror or exc})") from exc
        return LineImage.from_bytes(data, category, str(path), max_pixels, keep_bytes)


@dataclass(frozen=True)
class LineResult:
    """One scored image: what `dmad predict` writes and `dmad serve` answers."""

    source: str
    category: str
    score: float
    decision: str  # "OK" or "NG"
    threshold: float
    threshold_source: str  # "calibrated", "override" or "global"
    version: str
    content_hash: str
    width: int
    height: int
    top_patches: list[dict[str, Any]]  # [{"box": [x0, y0, x1, y1], "score": s}] in image pixels, best first
    patch_map: np.ndarray = field(repr=False)  # float32 (gh, gw)

    @staticmethod
    def of(image: LineImage, grid: np.ndarray, score: float, threshold: float, threshold_source: str,
           version: str) -> LineResult:
        """The result of one scored image: its decision by ``threshold`` and its top patches in its pixels."""
        height, width = image.array.shape[:2]
        return LineResult(image.source, image.category, float(score), decide(float(score), threshold), threshold,
                          threshold_source, version, image.content_hash, width, height,
                          top_patches(grid, width, height), np.asarray(grid, np.float32))

    def record(self) -> dict[str, Any]:
        """The JSON-ready fields (no patch grid)."""
        return {"path": self.source, "class": self.category, "score": round(self.score, 6), "decision": self.decision,
                "threshold": round(self.threshold, 6), "threshold_source": self.threshold_source,
                "model_version": self.version, "sha256": self.content_hash, "width": self.width,
                "height": self.height, "top_patches": self.top_patches}


class LineModel:
    """A model version ready to score line images, with the per-class thresholds in force when loaded."""

    def __init__(self, version: ModelVersion, model: DMAD, thresholds: dict[str, ClassThreshold],
                 knn_baseline: bool = False):
        self.version = version.name
        self.version_id = version.id
        self.model = model
        self.thresholds = thresholds
        # benchmarks/serve.py only: score with the PatchCore kNN baseline on the same features and bank, to
        # measure the service's cost against it (its scores are on another scale: decisions mean nothing)
        self.knn_baseline = knn_baseline

    @classmethod
    def load(cls, home: Home, sessions: sessionmaker[Session], version: str | int | None = None,
             knn_baseline: bool = False) -> LineModel:
        """The active version (or the named one) with its thresholds; Conflict when there is none."""
        with sessions() as session:
            row = versions.version_or_active(session, version)
            thresholds = class_thresholds(session, row, home.load_settings().false_alarm_rate)
        return cls(row, load_model(home, row), thresholds, knn_baseline)

    @property
    def categories(self) -> list[str]:
        return sorted(self.thresholds)

    def check_category(self, category: str) -> ClassThreshold:
        """The class's threshold; NotFound naming the classes this version knows."""
        return threshold_for(self.thresholds, category, self.version)

    def score(self, images: Sequence[LineImage], cache_features: bool = False) -> list[LineResult]:
        """Score a batch (one backbone call per input size); features are cached only when asked (images
        that join the pool are scored again at every retrain)."""
        limits = [self.check_category(img.category) for img in images]
        items = [ImageItem(category=img.category, hash=img.content_hash, array=img.array) for img in images]
        if self.knn_baseline:
            predictions = self.model.knn_predict(items, batch_size=max(1, len(items)), cache_features=cache_features)
        else:
            predictions = self.model.predict(items, batch_size=max(1, len(items)), progress_bar=False,
                                             cache_features=cache_features)
        return [LineResult.of(img, p.patch_scores, p.image_score, limit.threshold, limit.source, self.version)
                for img, limit, p in zip(images, limits, predictions, strict=True)]

    def heatmap(self, result: LineResult) -> np.ndarray:
        """The result's pixel heat map at the image's size (the same map every other view draws)."""
        return self.model.anomaly_map(result.patch_map, (result.height, result.width))


class ExportedLineModel:
    """A file from `dmad export` in the place of a LineModel (`dmad predict --model`): the same results,
    computed by torch.jit or onnxruntime from the file alone."""

    def __init__(self, path: str | Path):
        from app.services.exported import ExportedModel

        try:
            self.exported = ExportedModel.load(path)
        except (ValueError, OSError) as exc:
            raise Invalid(f"cannot load {path}: {exc}") from exc
        self.version = self.exported.version
        self.version_id = None
        self.thresholds = self.exported.thresholds

    @property
    def categories(self) -> list[str]:
        return self.exported.categories

    def check_category(self, category: str) -> float:
        return threshold_for(self.thresholds, category, self.version)

    def score(self, images: Sequence[LineImage], cache_features: bool = False) -> list[LineResult]:
        out = []
        for img in images:
            threshold = self.check_category(img.category)
            grid, score, _heat = self.exported.score(img.array, img.category)
            out.append(LineResult.of(img, grid, score, threshold, "exported", self.version))
        return out


def heat_scale(validation_scores: Sequence[float] | None, threshold: float) -> tuple[float, float]:
    """The colour scale of a result's heat map: from the class's ordinary level (its lowest validation
    score; 0, a typical normal patch, where none are known) to its threshold, the NG level."""
    return min(min(validation_scores or [0.0]), threshold - 1e-6), threshold
