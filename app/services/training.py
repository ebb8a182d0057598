"""Training a model version from the database: the first (unsupervised) one from scratch, and the
warm-started retrain that every annotation triggers.

One version is one pass of: read what the database holds now (normal images, annotations), fit or
update the engine, write the model into a temporary folder, score a bounded evaluation set, publish the
folder as a candidate with its metrics, and only then promote it. The promotion queues the pool's
re-ranking under the new version as chunks that workers share (app/services/reranking.py), so the time
from an annotation to an active version does not grow with the pool. A crash anywhere before the
promotion leaves the active version untouched; a temporary folder is never listed.

How each kind of annotation is used (see docs/loop.md):
- a defect with a mask: its patches (filtered against the normal bank) form the *seen* part of the
  abnormal bank, and the anomaly-centre part is rebuilt around them; the image leaves evaluation;
- a confirmed normal: the image joins its category's normal training data (normal bank + mapper);
- a defect without a mask: the image's highest-scoring patches become the *weak* part of the abnormal
  bank (provenance 'weak'), a weaker signal than a mask; the image leaves evaluation.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from app.home_folder import Home
from app.services import versions
from app.services.annotations import active_annotations, load_mask
from app.services.decisions import DECISION_KEY, calibrated_decision
from app.services.read_models import VALIDATION_SCORES_KEY
from app.services.scoring import engine_config, feature_store, image_item, load_model, pool_rows
from app.services.version_change import CHANGE_KEY, EVALUATION_SET_KEY, evaluation_fingerprint, measure_change
from db.engine import write_transaction
from db.models import Annotation, Image, ModelVersion
from db.repositories import build_trained_on, record_metrics, store_pool_scores
from dmad_core.data.readers import ImageRecord
from dmad_core.errors import Conflict
from dmad_core.evaluation import class_metrics, outlier_items
from dmad_core.model import DMAD, DefectAnnotation, ImageItem, Prediction, Progress, no_progress

log = logging.getLogger(__name__)

Checkpoint = Callable[[str], None]  # raises when the job must stop (lease lost, cancelled)
N_PROCEDURAL_OUTLIERS = 120


def _no_checkpoint(message: str) -> None:
    pass


@dataclass
class TrainingData:
    """What the database holds now, in the engine's terms. Nothing here grows with the pool: the pool is
    re-ranked after the promotion (app/services/reranking.py)."""

    normal: list[ImageItem]
    confirmed_normals: list[ImageItem]
    annotations: list[DefectAnnotation]
    evaluation: list[Image]  # the bounded evaluation set (`evaluation_set`); detached rows
    trained_on: dict[str, Any]


@dataclass
class TrainingOutcome:
    version: str
    version_id: int
    mode: Literal["scratch", "warm_start"]
    seconds: dict[str, float]
    metrics: dict[str, dict[str, float | None]]
    trained_on: dict[str, Any] = field(default_factory=dict)


def evaluation_set(session: Session, max_per_label: int) -> list[Image]:
    """Images with ground truth that no annotation has touched, at most `max_per_label` per class and
    label (normal, defective), chosen by content hash: a fixed sample, so that every version is measured on
    the same images while the pool grows, and a retrain's evaluation costs the same at any pool size."""
    untouched = (Image.role.in_(("pool", "evaluation")), Image.gt_label.is_not(None),
                 ~exists().where(Annotation.image_id == Image.id, Annotation.deleted_at.is_(None)))
    groups = session.execute(select(Image.category_id, Image.gt_label).where(*untouched).distinct()).all()
    chosen: list[Image] = []
    for category_id, label in sorted(groups):
        chosen += session.scalars(
            select(Image).options(selectinload(Image.category))
            .where(*untouched, Image.category_id == category_id, Image.gt_label == label)
            .order_by(Image.content_hash).limit(max_per_label))
    return sorted(chosen, key=lambda img: img.id)


def gather_training_data(session: Session, home: Home) -> TrainingData:
    """One consistent read of the training data (a single transaction)."""
    with session.begin():
        annotations = active_annotations(session)
        trained_on = build_trained_on(session)
        normal_rows = session.scalars(select(Image).options(selectinload(Image.category))
                                      .where(Image.role == "train_normal").order_by(Image.id))
        normal = [image_item(img) for img in normal_rows]
        confirmed, defects = [], []
        for ann in annotations:
            image = ann.image
            if ann.kind == "normal":
                confirmed.append(image_item(image))
            elif ann.kind == "defect_mask":
                defects.append(DefectAnnotation(image_item(image), load_mask(ann, home)))
            else:
                defects.append(DefectAnnotation(image_item(image), None))
        evaluation = evaluation_set(session, home.load_settings().evaluation_max_per_label)
        session.expunge_all()
    return TrainingData(normal, confirmed, defects, evaluation, trained_on)


def evaluate(model: DMAD, images: list[Image], predictions: dict[int, Any]) -> dict[str, dict[str, float | None]]:
    """Per-category metrics of already computed predictions (image id -> Prediction)."""
    out: dict[str, dict[str, float | None]] = {}
    for category in sorted({img.category.name for img in images}):
        rows = [img for img in images if img.category.name == category]
        if len({img.gt_label for img in rows}) < 2:
            continue  # AUROC needs both normal and defective images
        records = [ImageRecord(path=Path(img.path), category=category, split="test", label=int(img.gt_label),
                               defect_type=img.defect_type or "", mask_path=Path(img.gt_mask_path) if img.gt_mask_path else None)
                   for img in rows]
        out[category] = class_metrics(records, [predictions[img.id] for img in rows], model).to_dict()
    return out


def train_version(home: Home, sessions: sessionmaker[Session], *, warm_start: bool, job_id: int | None = None,
                  progress: Progress = no_progress, checkpoint: Checkpoint = _no_checkpoint) -> TrainingOutcome:
    """Train, evaluate and publish one version, then promote it. `warm_start` updates the active
    version (falls back to training from scratch when there is none)."""
    t_start = time.perf_counter()
    with sessions() as session:
        _fail_stale_candidates(session, job_id)
        data = gather_training_data(session, home)
        parent = versions.active_version(session)
    if not data.normal:
        raise Conflict("no normal training images; ingest category folders with `dmad ingest` first")
    seconds: dict[str, float] = {}
    mode: Literal["scratch", "warm_start"] = "warm_start" if warm_start and parent is not None else "scratch"
    t0 = time.perf_counter()
    eval_items = [image_item(img) for img in data.evaluation]
    before: list[Prediction] | None = None  # the parent's scores of the same images: what the retrain bought
    if mode == "warm_start":
        progress(0.0, f"loading {parent.name}")
        model = load_model(home, parent)
        before = model.predict(eval_items, progress_bar=False)
        epochs = home.load_settings().retrain_epochs
        model.update(data.annotations, data.confirmed_normals, epochs=epochs,
                     progress=lambda f, m: progress(0.6 * f, m))
    else:
        config = engine_config(home)
        settings = home.load_settings()
        outliers = outlier_items(Path(settings.outliers_dir) if settings.outliers_dir else None,
                                 N_PROCEDURAL_OUTLIERS, config.mapper.seed, config.bank.outlier_images_max)
        model = DMAD(config, feature_store(home, config))
        model.fit(data.normal + data.confirmed_normals, outliers, data.annotations,
                  progress=lambda f, m: progress(0.6 * f, m))
    seconds["train"] = round(time.perf_counter() - t0, 2)
    seconds.update({f"train_{k}": round(v, 2) for k, v in model.timings_.items()})
    checkpoint("trained")

    t0 = time.perf_counter()
    progress(0.6, f"scoring {len(data.evaluation)} evaluation images")
    predictions = {img.id: p for img, p in zip(data.evaluation, model.predict(
        eval_items, progress=lambda f, m: progress(0.6 + 0.3 * f, m), progress_bar=False), strict=True)}
    seconds["score"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    progress(0.9, f"evaluating on {len(data.evaluation)} images with ground truth")
    metrics = evaluate(model, data.evaluation, predictions)
    change = None
    if before is not None:  # the parent on the same images (its heat maps depend on the config alone)
        after = [predictions[img.id] for img in data.evaluation]
        change = measure_change(parent.name, data.evaluation, before, after, model, data.trained_on,
                                evaluate(model, data.evaluation, dict(zip(predictions, before, strict=True))),
                                metrics)
    seconds["evaluate"] = round(time.perf_counter() - t0, 2)
    checkpoint("publishing")

    progress(0.95, "publishing the new version")
    config_record = {
        "preset": home.load_settings().preset, "mode": mode, "job_id": job_id,
        "pixel_threshold": model.pixel_threshold_, "image_threshold": model.image_threshold_,
        "mask_peak_shares": model.mask_peak_shares_,  # Label Studio's pre-annotation level per class
        VALIDATION_SCORES_KEY: model.validation_scores_,  # per class: Label Studio's 0-1 score is a percentile
        DECISION_KEY: calibrated_decision(model.validation_scores_, home.load_settings().false_alarm_rate),
        "bank_sizes": {"normal": model.normal_bank_.part_sizes(), "abnormal": model.abnormal_bank_.part_sizes()},
        "engine": model.config.to_dict(),
        EVALUATION_SET_KEY: evaluation_fingerprint(data.evaluation),
        CHANGE_KEY: change,
    }
    with sessions() as session:
        name, tmp = versions.new_version_dir(home, session)
        version: ModelVersion | None = None
        try:
            model.save(tmp)
            seconds["total"] = round(time.perf_counter() - t_start, 2)
            config_record["seconds"] = seconds
            version = versions.commit_version(
                session, home, name, tmp, config_record, parent.id if parent else None, data.trained_on,
                status="candidate", message=f"{mode.replace('_', ' ')}; job {job_id}" if job_id else mode)
            scored_pool = [img for img in data.evaluation if img.role == "pool"]  # the re-ranking skips them
            with write_transaction(session):
                record_metrics(session, version.id, metrics)
                store_pool_scores(session, version.id,
                                  pool_rows(scored_pool, [predictions[img.id] for img in scored_pool]))
            checkpoint("promoting")
            versions.promote(session, version.id, home.load_settings().rerank_chunk_images)
        except BaseException:
            session.rollback()  # whatever read or write was still open when the failure came
            if version is None:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                _mark_failed(session, version.id)
            raise
    progress(1.0, f"{name} is active")
    log.info("trained %s (%s) in %.1f s", name, mode, time.perf_counter() - t_start)
    return TrainingOutcome(name, version.id, mode, seconds, metrics, data.trained_on)


def _mark_failed(session: Session, version_id: int) -> None:
    with write_transaction(session):
        version = session.get(ModelVersion, version_id, populate_existing=True)
        if version is not None and version.status == "candidate":
            version.status = "failed"


def _fail_stale_candidates(session: Session, job_id: int | None) -> None:
    """A worker that died between publishing and promoting left a candidate: the retry replaces it."""
    if job_id is None:
        return
    with write_transaction(session):
        for version in session.scalars(select(ModelVersion).where(ModelVersion.status == "candidate")):
            if (version.config or {}).get("job_id") == job_id:
                version.status = "failed"
                version.message = f"{version.message}; abandoned: its worker stopped before promoting it"

