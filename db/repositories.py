"""Small query helpers over the models. They flush but never commit: the caller owns the transaction."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
from sqlalchemy import ColumnElement, delete, exists, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, contains_eager

from db.models import (
    IMAGE_ROLES,
    Annotation,
    Category,
    Image,
    ImageRole,
    LabelTask,
    Metric,
    ModelVersion,
    PoolScore,
)
from dmad_core.errors import Invalid, NotFound

COUNT_KEYS = ("normal_images", "defect_masks", "confirmed_normals", "weak_defects")
_KIND_COUNT = {"defect_mask": "defect_masks", "normal": "confirmed_normals", "defect_no_mask": "weak_defects"}
_CHUNK = 500  # ids per IN (...) list: well below SQLite's bound-parameter limit


def get_or_create_category(session: Session, name: str) -> Category:
    """The category called `name`, created if new (safe against a concurrent creator)."""
    name = name.strip()
    if not name:
        raise Invalid("a category name cannot be empty")
    for _ in range(2):
        found = session.scalars(select(Category).where(Category.name == name)).first()
        if found is not None:
            return found
        category = Category(name=name)
        try:
            with session.begin_nested():
                session.add(category)
            return category
        except IntegrityError:
            continue
    raise RuntimeError(f"could not create category {name!r}")


def _category(session: Session, category: Category | str | int) -> Category:
    if isinstance(category, Category):
        return category
    if isinstance(category, int):
        found = session.get(Category, category)
    else:
        found = session.scalars(select(Category).where(Category.name == category)).first()
    if found is None:
        raise NotFound(f"category {category!r} does not exist; ingest its images first with `dmad ingest`")
    return found


def add_image(session: Session, category: Category | str, path: str | Path, role: ImageRole, *,
              gt_label: int | None = None, gt_mask_path: str | Path | None = None,
              defect_type: str | None = None) -> Image:
    """Record an image file; idempotent on (category, content hash): the same bytes already in the
    category return the existing row unchanged. Reads the file once, for its hash and its size, and
    refuses files that do not decode."""
    if role not in IMAGE_ROLES:
        raise ValueError(f"role must be one of {IMAGE_ROLES}, not {role!r}")
    if gt_label not in (None, 0, 1):
        raise ValueError(f"gt_label must be 0 (normal), 1 (defective) or None, not {gt_label!r}")
    file = Path(path).expanduser().resolve()
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise Invalid(f"cannot read image file {file}: {exc.strerror or exc}") from exc
    content_hash = hashlib.sha256(data).hexdigest()
    cat = category if isinstance(category, Category) else get_or_create_category(session, category)
    if cat.id is not None:
        existing = session.scalars(
            select(Image).where(Image.category_id == cat.id, Image.content_hash == content_hash)
        ).first()
        if existing is not None:
            return existing
    try:
        with PIL.Image.open(io.BytesIO(data)) as im:
            im.load()
            width, height = im.size
    except Exception as exc:
        raise Invalid(f"corrupt or unreadable image file {file}: {exc}") from exc
    image = Image(category=cat, content_hash=content_hash, path=str(file), role=role, width=width,
                  height=height, gt_label=gt_label,
                  gt_mask_path=str(Path(gt_mask_path).expanduser().resolve()) if gt_mask_path else None,
                  defect_type=defect_type)
    session.add(image)
    session.flush()
    return image


def images_by_role(session: Session, role: ImageRole, category: Category | str | int | None = None) -> list[Image]:
    query = select(Image).where(Image.role == role).order_by(Image.id)
    if category is not None:
        query = query.where(Image.category_id == _category(session, category).id)
    return list(session.scalars(query))


def untouched_ground_truth() -> tuple[ColumnElement[bool], ...]:
    """Where-clauses of the images a version can be evaluated on: pool (or evaluation) images with ground
    truth that no live annotation has touched (an annotated image trained the version)."""
    return (Image.role.in_(("pool", "evaluation")), Image.gt_label.is_not(None),
            ~exists().where(Annotation.image_id == Image.id, Annotation.deleted_at.is_(None)))


def evaluation_counts(session: Session, max_per_label: int) -> dict[str, int]:
    """Per class, how many images a retrain evaluates on: the untouched images with ground truth, at most
    ``max_per_label`` per ground-truth label (``HomeSettings.evaluation_max_per_label``)."""
    counts: dict[str, int] = {}
    for name, _label, n in session.execute(
            select(Category.name, Image.gt_label, func.count(Image.id)).join(Image, Image.category_id == Category.id)
            .where(*untouched_ground_truth()).group_by(Category.name, Image.gt_label)):
        counts[name] = counts.get(name, 0) + min(int(n), max_per_label)
    return counts


def record_metrics(session: Session, version_id: int, metrics: Mapping[str, Mapping[str, float | None]]) -> None:
    """Store {category name: {metric name: value}} for a version; a repeated name overwrites."""
    for category_name, values in metrics.items():
        category = get_or_create_category(session, category_name)
        existing = {m.name: m for m in session.scalars(
            select(Metric).where(Metric.version_id == version_id, Metric.category_id == category.id))}
        for name, value in values.items():
            value = None if value is None or not np.isfinite(value) else float(value)
            if name in existing:
                existing[name].value = value
            else:
                session.add(Metric(version_id=version_id, category_id=category.id, name=name, value=value))
    session.flush()


@dataclass(frozen=True)
class MetricRow:
    version: str
    version_id: int
    created_at: datetime
    activated_at: datetime | None
    category: str
    name: str
    value: float | None


def metric_history(session: Session) -> list[MetricRow]:
    """Every metric of every version, oldest version first, for the history charts."""
    rows = session.execute(
        select(ModelVersion.name, ModelVersion.id, ModelVersion.created_at, ModelVersion.activated_at,
               Category.name, Metric.name, Metric.value)
        .join(Metric, Metric.version_id == ModelVersion.id)
        .join(Category, Category.id == Metric.category_id)
        .order_by(ModelVersion.created_at, ModelVersion.id, Category.name, Metric.name)
    )
    return [MetricRow(*row) for row in rows]


def training_counts(session: Session) -> dict[str, dict[str, int]]:
    """What a training started now would see, per category: normal training images and active
    annotations by kind (defect masks, confirmed normals, weak defects without a mask)."""
    counts = {name: dict.fromkeys(COUNT_KEYS, 0) for name in session.scalars(select(Category.name))}
    for name, n in session.execute(
        select(Category.name, func.count(Image.id)).join(Image, Image.category_id == Category.id)
        .where(Image.role == "train_normal").group_by(Category.name)
    ):
        counts[name]["normal_images"] = n
    for name, kind, n in session.execute(
        select(Category.name, Annotation.kind, func.count(Annotation.id))
        .join(Image, Image.category_id == Category.id).join(Annotation, Annotation.image_id == Image.id)
        .where(Annotation.deleted_at.is_(None)).group_by(Category.name, Annotation.kind)
    ):
        counts[name][_KIND_COUNT[kind]] = n
    return counts


def build_trained_on(session: Session) -> dict[str, Any]:
    """The `ModelVersion.trained_on` record for a training started now."""
    ids = session.scalars(select(Annotation.id).where(Annotation.deleted_at.is_(None)).order_by(Annotation.id))
    return {"categories": training_counts(session), "annotation_ids": list(ids)}


@dataclass(frozen=True)
class VersionCountsRow:
    version: str
    version_id: int
    category: str
    normal_images: int
    defect_masks: int
    confirmed_normals: int
    weak_defects: int


def annotation_counts_by_version(session: Session) -> list[VersionCountsRow]:
    """What each version was trained on, per category (from its `trained_on` record)."""
    out = []
    for version in session.scalars(select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.id)):
        for category, counts in sorted((version.trained_on or {}).get("categories", {}).items()):
            out.append(VersionCountsRow(version.name, version.id, category,
                                        *(int(counts.get(k, 0)) for k in COUNT_KEYS)))
    return out


@dataclass(frozen=True)
class PoolScoreRow:
    """One scored pool image, as the scoring job produces it."""

    image_id: int
    score: float
    patch_map: np.ndarray  # (gh, gw) patch-grid scores; stored as float16
    top_patches: Sequence[Mapping[str, Any]] = ()  # [{"box": [x0, y0, x1, y1], "score": s}] in image pixels
    knn_score: float | None = None  # the scorer's kNN term alone (``Prediction.knn_score``)
    classifier_score: float | None = None  # ... and its classifier term (``Prediction.classifier_score``)


def _plain(x: Any) -> Any:
    """A JSON-ready Python number from a numpy scalar (ints stay ints)."""
    return x.item() if isinstance(x, np.generic) else x


def store_pool_scores(session: Session, version_id: int, rows: Iterable[PoolScoreRow]) -> int:
    """Bulk-store a version's pool scores, replacing earlier scores of the same images; returns the
    number stored. One executemany per chunk, so 10,000 rows take a fraction of a second."""
    values = []
    for row in rows:
        grid = np.asarray(row.patch_map)
        if grid.ndim != 2:
            raise ValueError(f"patch_map must be 2-D (gh, gw), got shape {grid.shape}")
        values.append({
            "version_id": version_id, "image_id": int(row.image_id), "score": float(row.score),
            "knn_score": None if row.knn_score is None else float(row.knn_score),
            "classifier_score": None if row.classifier_score is None else float(row.classifier_score),
            "top_patches": [{"box": [_plain(c) for c in p["box"]], "score": float(p["score"])}
                            for p in row.top_patches],
            "patch_map": np.ascontiguousarray(grid, dtype=np.float16).tobytes(),
            "map_shape": [int(grid.shape[0]), int(grid.shape[1])],
        })
    image_ids = [v["image_id"] for v in values]
    for i in range(0, len(image_ids), _CHUNK):
        session.execute(delete(PoolScore).where(PoolScore.version_id == version_id,
                                                PoolScore.image_id.in_(image_ids[i:i + _CHUNK])))
    for i in range(0, len(values), 5000):
        session.execute(insert(PoolScore), values[i:i + 5000])
    session.flush()
    return len(values)


def top_pool_scores(session: Session, version_id: int, limit: int = 50,
                    category: Category | str | int | None = None,
                    min_score: float | None = None, unannotated: bool = False) -> list[PoolScore]:
    """The highest-scoring pool images of a version, best first, each with its `image` loaded;
    `unannotated` leaves out images that already carry a (not deleted) annotation."""
    query = (
        select(PoolScore).join(PoolScore.image).options(contains_eager(PoolScore.image))
        .where(PoolScore.version_id == version_id)
        .order_by(PoolScore.score.desc(), PoolScore.id).limit(limit)
    )
    if category is not None:
        query = query.where(Image.category_id == _category(session, category).id)
    if min_score is not None:
        query = query.where(PoolScore.score >= min_score)
    if unannotated:
        query = query.where(~exists().where(Annotation.image_id == PoolScore.image_id,
                                            Annotation.deleted_at.is_(None)))
    return list(session.scalars(query))


def record_label_tasks(session: Session, project_id: int, model_version: str,
                       tasks: Iterable[tuple[int, int | None]]) -> int:
    """Remember which images are tasks in a Label Studio project (``(image_id, task_id)`` pairs); an image
    already recorded there keeps its row, gaining the task id if it had none. Returns the rows added."""
    pairs = {int(image_id): task_id for image_id, task_id in tasks}
    if not pairs:
        return 0
    known = {row.image_id: row for row in session.scalars(
        select(LabelTask).where(LabelTask.project_id == project_id, LabelTask.image_id.in_(list(pairs))))}
    added = 0
    for image_id, task_id in pairs.items():
        row = known.get(image_id)
        if row is None:
            session.add(LabelTask(image_id=image_id, project_id=project_id, model_version=model_version,
                                  task_id=None if task_id is None else int(task_id)))
            added += 1
        elif row.task_id is None and task_id is not None:
            row.task_id = int(task_id)
    session.flush()
    return added
