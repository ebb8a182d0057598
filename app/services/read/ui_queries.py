"""Every query the Streamlit UI makes, so that its pages stay thin and never hold SQL.

Functions take a plain session and return small frozen dataclasses or DataFrames that stay readable
after the session closes. Reads ask only for what one page shows: the Review grid pages through
`pool_scores` with LIMIT/OFFSET along the (version_id, score) index instead of loading the pool.
The few writes (enqueueing jobs) commit their own short transaction, like the services they call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Select, case, exists, func, select
from sqlalchemy.orm import Session

from app.home_folder import HomeSettings
from app.services.loop.annotations import RETRAIN_KEY
from app.services.loop.reranking import RerankProgress, rerank_progress  # noqa: F401 (the pages' query)
from app.services.read.read_models import (
    ACTIVE_JOB_STATUSES,
    JobInfo,
    VersionInfo,
    active_version_info,
    job_info,
    normal_percentile_of,
    version_info,
)
from db.engine import write_transaction
from db.models import Annotation, Category, Image, Job, LabelTask, ModelVersion, PoolScore
from db.queue import JobPayload, JobType, Trigger, UploadToScore, enqueue, list_jobs
from db.repositories import COUNT_KEYS, annotation_counts_by_version, evaluation_counts, metric_history
from dmad_core.metrics import METRIC_NAMES


# -- versions ---------------------------------------------------------------------------------------
def versions(session: Session) -> list[VersionInfo]:
    """All versions, oldest first (the order the metric charts use)."""
    rows = session.scalars(select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.id))
    return [version_info(v) for v in rows]


def trained_on_summary(trained_on: dict[str, Any]) -> str:
    """One readable line per category of what a version learnt from, e.g.
    'tiles: 20 normal, 3 masks, 2 confirmed normal'."""
    parts = []
    for category, counts in sorted((trained_on or {}).get("categories", {}).items()):
        text = f"{category}: {int(counts.get('normal_images', 0))} normal"
        for key, label in (("defect_masks", "masks"), ("confirmed_normals", "confirmed normal"),
                           ("weak_defects", "defects without mask")):
            if counts.get(key):
                text += f", {int(counts[key])} {label}"
        parts.append(text)
    return "; ".join(parts) or "-"


def versions_frame(session: Session) -> pd.DataFrame:
    """The versions table of the Training page, newest first."""
    rows = [{"name": v.name, "status": v.status, "created": v.created_at, "activated": v.activated_at,
             "trained on": trained_on_summary(v.trained_on), "message": v.message}
            for v in reversed(versions(session))]
    return pd.DataFrame(rows, columns=["name", "status", "created", "activated", "trained on", "message"])


# -- overview ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Overview:
    """What the Home page shows."""

    images: pd.DataFrame  # one row per category; columns: the image roles, then annotation counts
    n_images: int
    n_annotations: int
    n_versions: int
    active: VersionInfo | None
    pool_scored: int  # pool images scored by the active version
    jobs: dict[str, int]  # job status -> count


def overview(session: Session, evaluation_max_per_label: int | None = None) -> Overview:
    """What the Home page shows; its "evaluation" column counts the images a retrain is measured on
    (untouched images with ground truth, at most ``evaluation_max_per_label`` per label; default: the home
    setting's default)."""
    per_role = session.execute(
        select(Category.name, Image.role, func.count(Image.id))
        .join(Image, Image.category_id == Category.id).group_by(Category.name, Image.role))
    per_kind = session.execute(
        select(Category.name, Annotation.kind, func.count(Annotation.id))
        .join(Image, Image.category_id == Category.id).join(Annotation, Annotation.image_id == Image.id)
        .where(Annotation.deleted_at.is_(None)).group_by(Category.name, Annotation.kind))
    table: dict[str, dict[str, int]] = {}
    for category, key, n in [*per_role, *per_kind]:
        table.setdefault(category, {})[key] = int(n)
    cap = evaluation_max_per_label if evaluation_max_per_label is not None else HomeSettings().evaluation_max_per_label
    for category, n in evaluation_counts(session, cap).items():
        table.setdefault(category, {})["evaluation"] = n  # not a role: the pool's images with ground truth
    columns = ["train_normal", "pool", "evaluation", "defect_mask", "normal", "defect_no_mask"]
    images = pd.DataFrame.from_dict(table, orient="index").reindex(columns=columns).fillna(0).astype(int)
    images = images.rename(columns={"defect_mask": "annotated defect (mask)", "normal": "confirmed normal",
                                    "defect_no_mask": "annotated defect (no mask)"}).sort_index()
    images.index.name = "category"
    active = active_version_info(session)
    pool_scored = 0 if active is None else int(session.scalar(
        select(func.count(PoolScore.id)).where(PoolScore.version_id == active.id)) or 0)
    jobs = {status: int(n) for status, n in session.execute(
        select(Job.status, func.count(Job.id)).group_by(Job.status))}
    return Overview(
        images=images,
        n_images=int(session.scalar(select(func.count(Image.id))) or 0),
        n_annotations=int(session.scalar(
            select(func.count(Annotation.id)).where(Annotation.deleted_at.is_(None))) or 0),
        n_versions=int(session.scalar(select(func.count(ModelVersion.id))) or 0),
        active=active, pool_scored=pool_scored, jobs=jobs)


def category_names(session: Session) -> list[str]:
    return list(session.scalars(select(Category.name).order_by(Category.name)))


# -- review -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReviewFilter:
    version_id: int
    categories: tuple[str, ...] = ()  # empty: all
    min_score: float | None = None
    hide_annotated: bool = True  # images with a live annotation are already reviewed
    exclude: tuple[int, ...] = ()  # image ids left out (the active-learning benchmark's skipped images)


@dataclass(frozen=True)
class ScoredImage:
    """A pool image as a version scored it, with what the UI needs to draw it."""

    image_id: int
    path: str
    category: str
    width: int
    height: int
    score: float
    top_patches: list[dict[str, Any]]  # [{"box": [x0, y0, x1, y1], "score": s}] in image pixels
    patch_map: np.ndarray  # float16 (gh, gw)
    version_id: int
    waiting_task: int | None = None  # sent to Label Studio, not annotated yet: its task id (0 when unknown)

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def label(self) -> str:
        """What tells this image apart in a caption: its class, its source folder and its file
        (``tiles · crack · 002.png``): file names repeat across a dataset's defect folders. A line image
        (stored under its content hash by the feed) is ``fabric · line · 469a0253``."""
        stored = _STORED_NAME.fullmatch(self.name)
        if stored:
            return f"{self.category} · line · {stored.group(1)[:8]}"
        return " · ".join([self.category, *([source_folder(self.path)] if source_folder(self.path) else []), self.name])


_STORED_NAME = re.compile(r"([0-9a-f]{64})\.\w+")  # the image store's file names (app/services/line/feed.py)


GENERIC_FOLDERS = {"rgb", "xyz", "gt", "images", "img", "test", "train", "pool", "uploads"}


def source_folder(path: str | Path) -> str | None:
    """The nearest parent folder that says something about the image (a defect type such as ``crack``, or
    ``good``), skipping layout folders like MVTec 3D-AD's ``rgb``."""
    for parent in Path(path).parents:
        if parent.name and parent.name.lower() not in GENERIC_FOLDERS:
            return parent.name
    return None


_LIVE_ANNOTATION = exists().where(Annotation.image_id == PoolScore.image_id, Annotation.deleted_at.is_(None))
# The image's Label Studio task (0 when its id could not be read back; NULL when it was never sent).
_LABEL_TASK = (select(func.coalesce(LabelTask.task_id, 0)).where(LabelTask.image_id == PoolScore.image_id)
               .order_by(LabelTask.sent_at.desc()).limit(1).correlate(PoolScore).scalar_subquery())
_SCORED_COLUMNS = (PoolScore.image_id, Image.path, Category.name, Image.width, Image.height, PoolScore.score,
                   PoolScore.top_patches, PoolScore.patch_map, PoolScore.map_shape, PoolScore.version_id,
                   case((~_LIVE_ANNOTATION, _LABEL_TASK), else_=None))


def _scored(row: Any) -> ScoredImage:
    image_id, path, category, width, height, score, top, blob, shape, version_id, waiting = row
    grid = np.frombuffer(blob, dtype=np.float16).reshape(shape)
    return ScoredImage(int(image_id), path, category, int(width), int(height), float(score), list(top or []),
                       grid, int(version_id), None if waiting is None else int(waiting))


def filtered(query: Select[Any], f: ReviewFilter) -> Select[Any]:
    """``query`` (from ``PoolScore``) joined to its image and class, restricted to the filter."""
    query = (query.join(Image, Image.id == PoolScore.image_id).join(Category, Category.id == Image.category_id)
             .where(PoolScore.version_id == f.version_id))
    if f.categories:
        query = query.where(Category.name.in_(list(f.categories)))
    if f.min_score is not None:
        query = query.where(PoolScore.score >= f.min_score)
    if f.hide_annotated:
        query = query.where(~_LIVE_ANNOTATION)
    if f.exclude:
        query = query.where(PoolScore.image_id.not_in(list(f.exclude)))
    return query


def review_page(session: Session, f: ReviewFilter, limit: int, offset: int = 0) -> list[ScoredImage]:
    """One page of the version's pool, highest score first."""
    query = filtered(select(*_SCORED_COLUMNS).select_from(PoolScore), f)
    query = query.order_by(PoolScore.score.desc(), PoolScore.image_id).limit(limit).offset(offset)
    return [_scored(row) for row in session.execute(query)]


def scored_images(session: Session, version_id: int, image_ids: list[int]) -> list[ScoredImage]:
    """The pool images ``image_ids`` as ``version_id`` scored them, in no particular order."""
    if not image_ids:
        return []
    query = (select(*_SCORED_COLUMNS).select_from(PoolScore).join(Image, Image.id == PoolScore.image_id)
             .join(Category, Category.id == Image.category_id)
             .where(PoolScore.version_id == version_id, PoolScore.image_id.in_(image_ids)))
    return [_scored(row) for row in session.execute(query)]


def review_count(session: Session, f: ReviewFilter) -> int:
    return int(session.scalar(filtered(select(func.count()).select_from(PoolScore), f)) or 0)


def rerank_note(version: str, p: RerankProgress) -> str:
    """What Review says while the pool's ranking under the active version is incomplete."""
    share = 100 * p.scored / max(1, p.pool)
    text = (f"Re-ranking the pool under {version}: {p.scored:,} of {p.pool:,} images so far ({share:.0f} %). "
            f"The grid shows only the images {version} has scored: those ranked highest by the previous version "
            "and the newest went first. ")
    if p.chunks_open:
        text += f"{p.chunks_open} chunks wait for a worker (`dmad worker`, or `dmad up`)."
    if p.chunks_failed:
        text += (f" {p.chunks_failed} chunks failed: their errors are on the Training page; promoting the "
                 "version again queues what is missing.")
    if not p.chunks_open and not p.chunks_failed:
        text += "No chunk is queued: promote the version again to queue the missing images."
    return text


def score_range(session: Session, version_id: int) -> tuple[float, float] | None:
    """(lowest, highest) image score of the version's pool: the slider's range and the heat map's
    colour scale (an image's score is its hottest patch, so every patch of the pool lies below the
    top; the lowest image score is the level of an ordinary normal image)."""
    lo, hi = session.execute(select(func.min(PoolScore.score), func.max(PoolScore.score))
                             .where(PoolScore.version_id == version_id)).one()
    return None if lo is None else (float(lo), float(hi))


def score_rank(session: Session, version_id: int, score: float) -> tuple[int, int]:
    """(rank, pool size): 1 is the version's most anomalous pool image."""
    higher = session.scalar(select(func.count(PoolScore.id))
                            .where(PoolScore.version_id == version_id, PoolScore.score > score)) or 0
    total = session.scalar(select(func.count(PoolScore.id)).where(PoolScore.version_id == version_id)) or 0
    return int(higher) + 1, int(total)


# -- one image --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageInfo:
    id: int
    path: str
    category: str
    role: str
    width: int
    height: int
    gt_label: int | None
    defect_type: str | None
    content_hash: str

    @property
    def name(self) -> str:
        return Path(self.path).name


def image_info(session: Session, image_id: int) -> ImageInfo | None:
    row = session.execute(
        select(Image.id, Image.path, Category.name, Image.role, Image.width, Image.height, Image.gt_label,
               Image.defect_type, Image.content_hash)
        .join(Category, Category.id == Image.category_id).where(Image.id == image_id)).first()
    return None if row is None else ImageInfo(*row)


def top_image_id(session: Session, version_id: int) -> int | None:
    """The version's highest-scoring pool image: what Inspect shows when nothing is picked."""
    return session.scalar(select(PoolScore.image_id).where(PoolScore.version_id == version_id)
                          .order_by(PoolScore.score.desc(), PoolScore.image_id).limit(1))


def image_score(session: Session, image_id: int, version_id: int) -> ScoredImage | None:
    row = session.execute(
        select(*_SCORED_COLUMNS).select_from(PoolScore).join(Image, Image.id == PoolScore.image_id)
        .join(Category, Category.id == Image.category_id)
        .where(PoolScore.image_id == image_id, PoolScore.version_id == version_id)).first()
    return None if row is None else _scored(row)


def score_history(session: Session, image_id: int) -> pd.DataFrame:
    """The image's score under every version that scored it, oldest version first."""
    rows = session.execute(
        select(ModelVersion.id, ModelVersion.name, ModelVersion.status, ModelVersion.created_at,
               PoolScore.score)
        .join(PoolScore, PoolScore.version_id == ModelVersion.id).where(PoolScore.image_id == image_id)
        .order_by(ModelVersion.created_at, ModelVersion.id))
    return pd.DataFrame(list(rows), columns=["version_id", "version", "status", "created", "score"])


def image_annotations(session: Session, image_id: int) -> list[Annotation]:
    """The image's live annotations, newest first (rows stay readable once the session closes, which
    is all `load_mask` needs)."""
    return list(session.scalars(select(Annotation).where(Annotation.image_id == image_id,
                                                         Annotation.deleted_at.is_(None))
                                .order_by(Annotation.updated_at.desc(), Annotation.id.desc())))


# -- jobs -------------------------------------------------------------------------------------------
def jobs(session: Session, limit: int = 50, routine_syncs: bool = True) -> list[JobInfo]:
    """The newest jobs, newest first; without ``routine_syncs``, Label Studio syncs that succeeded are left
    out (they run every minute and would push the trainings out of view: ``sync_summary`` counts them), and
    so are the pool's re-ranking chunks unless they failed (hundreds per version: ``rerank_progress`` sums
    them up)."""
    if routine_syncs:
        return [job_info(j) for j in list_jobs(session, limit=limit)]
    return [job_info(j) for j in list_jobs(session, limit=limit, hide_succeeded=(JobType.LABELSTUDIO_SYNC,),
                                            hide_unless_failed=(JobType.RERANK,))]


@dataclass(frozen=True)
class SyncSummary:
    runs: int  # succeeded syncs
    last: JobInfo | None  # the newest of them


def sync_summary(session: Session) -> SyncSummary:
    """How many Label Studio syncs succeeded, and the newest one (its message says what it pulled)."""
    runs = int(session.scalar(select(func.count(Job.id)).where(Job.type == JobType.LABELSTUDIO_SYNC, Job.status == "succeeded")) or 0)
    newest = list_jobs(session, limit=1, types=[JobType.LABELSTUDIO_SYNC], statuses=["succeeded"])
    return SyncSummary(runs, job_info(newest[0]) if newest else None)


def job(session: Session, job_id: int) -> JobInfo | None:
    found = session.get(Job, job_id, populate_existing=True)
    return None if found is None else job_info(found)


def any_active_job(session: Session) -> bool:
    return session.scalar(select(Job.id).where(Job.status.in_(ACTIVE_JOB_STATUSES)).limit(1)) is not None


def _enqueue(session: Session, type: JobType, payload: JobPayload, coalesce_key: str | None) -> JobInfo:
    with write_transaction(session):
        queued = enqueue(session, type, payload, coalesce_key=coalesce_key)
    return job_info(queued)


def enqueue_retrain(session: Session) -> JobInfo:
    """Queue a retrain, or return the one already waiting (annotations coalesce into one retrain)."""
    return _enqueue(session, JobType.RETRAIN, Trigger(trigger="ui"), RETRAIN_KEY)


def enqueue_score_upload(session: Session, path: str | Path, category: str) -> JobInfo:
    """Queue the scoring of an uploaded image; the worker leaves the score as the job's result."""
    return _enqueue(session, JobType.SCORE_UPLOAD, UploadToScore(path=str(path), category=category), None)


# -- metrics ----------------------------------------------------------------------------------------
def metric_frame(session: Session) -> pd.DataFrame:
    """Every metric of every version (long format), oldest version first."""
    rows = [{"version": r.version, "version_id": r.version_id, "created": r.created_at,
             "activated": r.activated_at, "category": r.category, "metric": r.name, "value": r.value}
            for r in metric_history(session)]
    return pd.DataFrame(rows, columns=["version", "version_id", "created", "activated", "category", "metric",
                                       "value"])


def training_data_frame(session: Session) -> pd.DataFrame:
    """What each version was trained on, per category, with its annotations summed: the x axis of the
    metric charts read against the labels that moved it."""
    created = {v.id: v.created_at for v in versions(session)}
    rows = []
    for r in annotation_counts_by_version(session):
        counts = {k: getattr(r, k) for k in COUNT_KEYS}
        rows.append({"version": r.version, "version_id": r.version_id, "created": created.get(r.version_id),
                     "category": r.category, **counts,
                     "annotations": r.defect_masks + r.confirmed_normals + r.weak_defects})
    return pd.DataFrame(rows, columns=["version", "version_id", "created", "category", *COUNT_KEYS,
                                       "annotations"])


def latest_metrics(frame: pd.DataFrame) -> tuple[str | None, pd.DataFrame]:
    """(version, table category x metric) of the newest version that has metrics."""
    if frame.empty:
        return None, pd.DataFrame()
    newest = frame.sort_values(["created", "version_id"]).iloc[-1]["version_id"]
    latest = frame[frame["version_id"] == newest]
    table = latest.pivot_table(index="category", columns="metric", values="value", aggfunc="first")
    ordered = [m for m in METRIC_NAMES if m in table.columns] + sorted(set(table.columns) - set(METRIC_NAMES))
    return str(latest["version"].iloc[0]), table[ordered]


# -- OK/NG thresholds -------------------------------------------------------------------------------
def thresholds_frame(session: Session, version_id: int, false_alarm_rate: float) -> pd.DataFrame:
    """Each class's OK/NG threshold of a version, where it comes from, and the error rates it implies
    (percent; None where there are no such images)."""
    from app.services.line.decisions import thresholds_with_rates

    def pct(x: float | None) -> float | None:
        return None if x is None else round(100 * x, 1)

    rows = []
    for t, rates in thresholds_with_rates(session, session.get(ModelVersion, version_id), false_alarm_rate):
        rows.append({"class": t.category, "threshold": round(t.threshold, 4), "source": t.source,
                     "calibrated": None if t.calibrated is None else round(t.calibrated, 4),
                     "false alarms, validation normals (%)": pct(rates.validation.false_alarm_rate),
                     "validation normals": rates.validation.normals,
                     "false alarms, confirmed normals (%)": pct(rates.annotated.false_alarm_rate),
                     "misses, annotated defects (%)": pct(rates.annotated.miss_rate),
                     "annotated defects": rates.annotated.defects, "note": t.note or ""})
    frame = pd.DataFrame(rows)
    # numbers stay numbers where a value is missing (NaN, shown as an empty cell, not as "None")
    missing = ["calibrated", "false alarms, validation normals (%)", "false alarms, confirmed normals (%)",
               "misses, annotated defects (%)"]
    return frame.astype({c: float for c in missing}) if not frame.empty else frame


def set_threshold(session: Session, version_id: int, category: str, threshold: float | None, note: str) -> None:
    from app.services.line.decisions import set_threshold as record

    record(session, session.get(ModelVersion, version_id), category, threshold, note)
