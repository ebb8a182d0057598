"""Scoring new images on the line: the two implementations of the scoring contract
(``app/services/line/inference.py``), and `dmad predict` (``predict_files``).

A ``LineModel`` (a home's version, the Python scorer) is loaded once and then scores batches of decoded
images: image score, the class's threshold and decision, top patches and the patch grid for a heat map. It
never changes after loading, so a request that started on one version finishes on it while a newer one is
being loaded beside it. An ``ExportedLineModel`` is a file from `dmad export` in its place: the same
results, computed by torch.jit or onnxruntime from the file alone, judged by the thresholds written in it.

Example::

    line = LineModel.load(home, sessions)            # the active version
    [result] = line.score([LineImage.from_file("part.png", "bottle")])
    result.decision                                  # "OK" or "NG"
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from app.home_folder import Home
from app.services.loop import versions
from app.services.line.decisions import ClassThreshold
from app.services.line.inference import (  # noqa: F401 (LineImage, LineResult, MAX_PIXELS: imported from here too)
    MAX_PIXELS, Inferencer, Judge, LineImage, LineResult, heat_scale)
from app.services.home_model import load_model
from db.models import ModelVersion
from dmad_core.errors import Invalid, UserError
from dmad_core.items import ImageItem
from dmad_core.model import DMAD

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


class LineModel(Inferencer):
    """A home's model version ready to score line images, with the per-class thresholds in force when
    loaded (the contract's Python implementation)."""

    def __init__(self, version: ModelVersion, model: DMAD, thresholds: dict[str, ClassThreshold],
                 knn_baseline: bool = False):
        self.judge = Judge(version.name, thresholds)
        self.version_id = version.id
        self.model = model
        # benchmarks/serve.py only: score with the PatchCore kNN baseline on the same features and bank, to
        # measure the service's cost against it (its scores are on another scale: decisions mean nothing)
        self.knn_baseline = knn_baseline

    @classmethod
    def load(cls, home: Home, sessions: sessionmaker[Session], version: str | int | None = None,
             knn_baseline: bool = False) -> LineModel:
        """The active version (or the named one) with its thresholds; Conflict when there is none."""
        with sessions() as session:
            row = versions.version_or_active(session, version)
            judge = Judge.of(session, row, home.load_settings().false_alarm_rate)
        return cls(row, load_model(home, row), judge.thresholds, knn_baseline)

    def forward(self, images: Sequence[LineImage], cache_features: bool = False) -> list[tuple[np.ndarray, float]]:
        """One backbone call per input size; features are cached only when asked (images that join the
        pool are scored again at every retrain)."""
        items = [ImageItem(category=img.category, hash=img.content_hash, array=img.array) for img in images]
        if self.knn_baseline:
            predictions = self.model.knn_predict(items, batch_size=max(1, len(items)), cache_features=cache_features)
        else:
            predictions = self.model.predict(items, batch_size=max(1, len(items)), progress_bar=False,
                                             cache_features=cache_features)
        return [(p.patch_scores, float(p.image_score)) for p in predictions]

    def heatmap(self, result: LineResult) -> np.ndarray:
        """The result's pixel heat map at the image's size (the same map every other view draws)."""
        return self.model.anomaly_map(result.patch_map, (result.height, result.width))

    def validation_scores(self, category: str) -> Sequence[float] | None:
        # None for a version saved before validation scores were recorded
        return (self.model.fitted().validation_scores or {}).get(category)


class ExportedLineModel(Inferencer):
    """A file from `dmad export` in the place of a LineModel (`dmad predict --model`): the same results,
    computed by torch.jit or onnxruntime from the file alone, judged by the thresholds written into it (with
    their sources; a file written before sources were says "exported")."""

    def __init__(self, path: str | Path):
        from app.services.line.exported import ExportedModel

        try:
            self.exported = ExportedModel.load(path)
        except (ValueError, OSError) as exc:
            raise Invalid(f"cannot load {path}: {exc}") from exc
        sources = self.exported.threshold_sources
        self.judge = Judge(self.exported.version, {
            c: ClassThreshold(c, t, sources.get(c, "exported"), None, None, 0)  # type: ignore[arg-type]
            for c, t in self.exported.thresholds.items()})

    def forward(self, images: Sequence[LineImage], cache_features: bool = False) -> list[tuple[np.ndarray, float]]:
        return [self.exported.score(img.array, img.category)[:2] for img in images]

    def heatmap(self, result: LineResult) -> np.ndarray:
        from dmad_core.config import DMADConfig
        from dmad_core.model import anomaly_map

        return anomaly_map(result.patch_map, (result.height, result.width), DMADConfig())


def load_inferencer(home: Home, sessions: sessionmaker[Session] | None, version: str | int | None = None,
                    model_file: str | Path | None = None) -> Inferencer:
    """The scorer `dmad predict` uses: the exported ``model_file`` when given, else the home's ``version``
    (default: the active one)."""
    if model_file is not None:
        return ExportedLineModel(model_file)
    if sessions is None:
        raise Invalid("scoring with the home's model needs its database")
    return LineModel.load(home, sessions, version)


@dataclass
class PredictReport:
    """What `dmad predict` did."""

    version: str
    scored: int = 0
    ng: int = 0
    skipped: int = 0
    fed: int = 0  # new in the pool (with ``ingest``)


def _batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def predict_files(line: Inferencer, files: Sequence[Path], on_results: Callable[[list[LineResult]], None],
                  category: str | None = None, batch_size: int = 4, ingest_into: tuple[Home, sessionmaker[Session]] | None = None,
                  heatmaps: Path | None = None, on_skip: Callable[[str], None] = lambda message: None,
                  on_batch: Callable[[int], None] = lambda n: None) -> PredictReport:
    """Score image files in batches with ``line`` (`dmad predict`).

    Args:
        line: the scorer (the home's version or an exported file).
        files: the image files, in order.
        on_results: gets each batch's results as soon as they are judged (a pipeline sees them as they come).
        category: the class of every image; None: each file's nearest parent folder named like a class.
        batch_size: images per backbone call.
        ingest_into: (home, sessions) to add the scored images to that home's pool; None: not added.
        heatmaps: a folder for a heat-map overlay PNG per image; None: none written.
        on_skip: gets the reason of each file that could not be scored.
        on_batch: gets the number of files of each batch done (a progress bar).

    Returns:
        The counts.
    """
    if batch_size < 1:
        raise Invalid("the batch size must be at least 1")
    if ingest_into is not None and line.version_id is None:
        raise Invalid("an exported file scores alone: adding images to the pool needs the home's model")
    if category is not None:
        line.check_category(category)
    if heatmaps is not None:
        heatmaps.mkdir(parents=True, exist_ok=True)
    report = PredictReport(line.version)
    for batch in _batches(list(files), batch_size):
        images = []
        for path in batch:
            of = category or category_from_path(path, line.categories)
            try:
                if of is None:
                    raise Invalid(f"{path}: no parent folder is named like a class of {line.version} "
                                  f"({', '.join(line.categories)}); pass --category")
                images.append(LineImage.from_file(path, of, keep_bytes=ingest_into is not None))
            except UserError as exc:
                report.skipped += 1
                on_skip(str(exc))
        results = line.score(images, cache_features=ingest_into is not None) if images else []
        on_results(results)
        for result in results:
            report.ng += result.decision == "NG"
            if heatmaps is not None:
                write_heatmap(heatmaps, line, result)
        if ingest_into is not None and images:
            from app.services.line.feed import feed

            home, sessions = ingest_into
            with sessions() as session:
                report.fed += feed(session, home, line.version_id, images, results).added
        report.scored += len(results)
        on_batch(len(batch))
    return report


def write_heatmap(folder: Path, line: Inferencer, result: LineResult) -> Path:
    """The image with its heat map blended in, coloured from the class's ordinary level to its threshold
    (``Inferencer.heat_scale``): the brightest colour means at or above the NG level."""
    import PIL.Image

    from app.services.imaging import heat_overlay, load_rgb

    lo, hi = line.heat_scale(result)
    model = getattr(line, "model", None)
    overlay = heat_overlay(load_rgb(result.source), result.patch_map, lo, hi,
                           config=None if model is None else model.config)
    path = folder / f"{Path(result.source).stem}-{result.content_hash[:8]}.png"
    PIL.Image.fromarray(overlay).save(path)
    return path
