"""The one scoring contract: how a part is judged OK or NG, whoever scores it.

Like anomalib's ``deploy/inferencers/base_inferencer.py`` (one base that its Torch and OpenVINO inferencers
both implement), ``Inferencer`` is the base of every scorer of line images: the home's Python model
(``prediction.LineModel``) and a file from `dmad export` (``prediction.ExportedLineModel``). A subclass only
computes patch grids and image scores (``forward``); the verdict is the base's, through the version's
``Judge``: the class's threshold in force (calibrated or overridden) and the one rule of
``dmad_core.decision.decide``. Everything that judges a part goes through it: the Inspect upload (the
worker's ``score_upload``), a pool image's verdict on Inspect (``Judge.for_version`` over its stored
score), `dmad predict`, `dmad serve`'s ``/v1/score`` and the exported file (whose thresholds and their
sources were written into it by `dmad export`). No decision reads the model's global ``image_threshold``.

This module imports no engine (PyTorch): the UI judges stored scores with it.

Example::

    judge = Judge.for_version(session, version_id)
    judge.verdict("bottle", 1.7)                 # Verdict(decision="NG", threshold=1.2, ...)
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.orm import Session

from app.services.line.decisions import DEFAULT_FALSE_ALARM_RATE, ClassThreshold, class_thresholds, threshold_for
from db.models import ModelVersion
from dmad_core.data.readers import CorruptImageError, ImageTooLarge, decode_image
from dmad_core.decision import Decision, decide
from dmad_core.errors import Invalid, NotFound, TooLarge

if TYPE_CHECKING:  # the engine is loaded by the worker and the line's processes only
    from app.home_folder import Home
    from dmad_core.model import DMAD

MAX_PIXELS = 60_000_000  # a 50-megapixel line camera fits; a decompression bomb does not
MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # an image file `dmad serve` and the Inspect page's upload accept
TOP_PATCHES = 8


# -- the verdict ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """OK or NG for one score, with the threshold that decided it and where that threshold comes from."""

    decision: Decision
    threshold: float
    threshold_source: str  # "calibrated" or "override" ("exported" for a file written before sources were)
    version: str


class Judge:
    """A version's per-class thresholds in force and the one rule that turns a score into OK/NG."""

    def __init__(self, version: str, thresholds: Mapping[str, ClassThreshold]):
        self.version = version
        self.thresholds = dict(thresholds)

    @classmethod
    def of(cls, session: Session, version: ModelVersion,
           false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE) -> Judge:
        """The thresholds in force now for ``version`` (``false_alarm_rate`` serves only versions that
        recorded no calibration)."""
        return cls(version.name, class_thresholds(session, version, false_alarm_rate))

    @classmethod
    def for_version(cls, session: Session, version_id: int,
                    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE) -> Judge:
        """``of`` by the version's id; NotFound when there is none."""
        row = session.get(ModelVersion, version_id)
        if row is None:
            raise NotFound(f"there is no model version {version_id}")
        return cls.of(session, row, false_alarm_rate)

    @property
    def categories(self) -> list[str]:
        return sorted(self.thresholds)

    def threshold(self, category: str) -> ClassThreshold:
        """The class's threshold in force; NotFound naming the classes the version knows."""
        return threshold_for(self.thresholds, category, self.version)

    def verdict(self, category: str, score: float) -> Verdict:
        """OK/NG of ``score`` for ``category`` (NG above the threshold; equal is OK, as calibrated)."""
        limit = self.threshold(category)
        return Verdict(decide(float(score), limit.threshold), limit.threshold, limit.source, self.version)


# -- what is scored and what comes back -----------------------------------------------------------
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


@dataclass(frozen=True)
class LineResult:
    """One scored image: what `dmad predict` writes, `dmad serve` answers and Inspect shows."""

    source: str
    category: str
    score: float
    decision: str  # "OK" or "NG"
    threshold: float
    threshold_source: str  # "calibrated" or "override"
    version: str
    content_hash: str
    width: int
    height: int
    top_patches: list[dict[str, Any]]  # [{"box": [x0, y0, x1, y1], "score": s}] in image pixels, best first
    patch_map: np.ndarray = field(repr=False)  # float32 (gh, gw)

    @staticmethod
    def of(image: LineImage, grid: np.ndarray, score: float, verdict: Verdict) -> LineResult:
        """The result of one scored image: its score, its verdict and its top patches in its pixels."""
        height, width = image.array.shape[:2]
        return LineResult(image.source, image.category, float(score), verdict.decision,
                          verdict.threshold, verdict.threshold_source, verdict.version, image.content_hash, width,
                          height, top_patches(grid, width, height), np.asarray(grid, np.float32))

    def record(self) -> dict[str, Any]:
        """The JSON-ready fields (no patch grid)."""
        return {"path": self.source, "class": self.category, "score": round(self.score, 6), "decision": self.decision,
                "threshold": round(self.threshold, 6), "threshold_source": self.threshold_source,
                "model_version": self.version, "sha256": self.content_hash, "width": self.width,
                "height": self.height, "top_patches": self.top_patches}


# -- the contract ---------------------------------------------------------------------------------
class Inferencer(ABC):
    """A scorer of line images (see the module docstring): ``forward`` is the backend's, the verdict the
    base's."""

    judge: Judge
    version_id: int | None = None  # the home's version row (None: an exported file, outside any home)

    @property
    def version(self) -> str:
        return self.judge.version

    @property
    def thresholds(self) -> dict[str, ClassThreshold]:
        return self.judge.thresholds

    @property
    def categories(self) -> list[str]:
        return self.judge.categories

    def check_category(self, category: str) -> ClassThreshold:
        """The class's threshold; NotFound naming the classes this version knows."""
        return self.judge.threshold(category)

    @abstractmethod
    def forward(self, images: Sequence[LineImage], cache_features: bool = False) -> list[tuple[np.ndarray, float]]:
        """(patch grid (gh, gw), image score) of each image, in order."""

    @abstractmethod
    def heatmap(self, result: LineResult) -> np.ndarray:
        """The result's pixel heat map at the image's size."""

    def validation_scores(self, category: str) -> Sequence[float] | None:
        """The class's validation normal scores (the heat map's ordinary level); None where unknown."""
        return None

    def score(self, images: Sequence[LineImage], cache_features: bool = False) -> list[LineResult]:
        """Score a batch and judge each image by its class's threshold (an unknown class fails before any
        image is scored)."""
        for image in images:
            self.check_category(image.category)
        outputs = self.forward(images, cache_features) if images else []
        return [LineResult.of(image, grid, score, self.judge.verdict(image.category, score))
                for image, (grid, score) in zip(images, outputs, strict=True)]

    def heat_scale(self, result: LineResult) -> tuple[float, float]:
        """The colour scale of a result's heat map: from the class's ordinary level (its lowest validation
        score; 0, a typical normal patch, where none are known) to its threshold, the NG level."""
        return heat_scale(self.validation_scores(result.category), result.threshold)


def heat_scale(validation_scores: Sequence[float] | None, threshold: float) -> tuple[float, float]:
    """``Inferencer.heat_scale`` from the numbers."""
    return min(min(validation_scores or [0.0]), threshold - 1e-6), threshold


# -- the worker's loaded model --------------------------------------------------------------------
class LoadedModel:
    """The version a worker scores with, loaded once rather than once a job (a load reads the banks and
    builds the backbone: seconds): its re-ranking chunks use the engine model, an upload the contract."""

    def __init__(self) -> None:
        self.folder_: str | None = None
        self.model_: DMAD | None = None

    def get(self, home: Home, version: ModelVersion) -> DMAD:
        """The engine model of ``version``, loaded when it is not the one held."""
        from app.services.home_model import load_model

        if self.model_ is None or self.folder_ != version.folder:
            self.model_, self.folder_ = load_model(home, version), version.folder
        return self.model_

    def line(self, home: Home, session: Session, version: ModelVersion) -> Inferencer:
        """``version`` as an ``Inferencer`` with the thresholds in force now (read at every call, so an
        override counts at once; the model is the one held)."""
        from app.services.line.prediction import LineModel

        return LineModel(version, self.get(home, version),
                         Judge.of(session, version, home.load_settings().false_alarm_rate).thresholds)
