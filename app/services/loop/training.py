"""Training a model version from the database: the first (unsupervised) one from scratch, and the
warm-started retrain that every annotation triggers.

One version is one pass of: read what the database holds now (normal images, annotations), fit or
update the engine, write the model into a temporary folder, score a bounded evaluation set, publish the
folder as a candidate with its metrics, and only then promote it. The promotion queues the pool's
re-ranking under the new version as chunks that workers share (app/services/loop/reranking.py), so the time
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

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from app.home_folder import Home, HomeSettings
from app.services.loop import versions
from app.services.loop.annotations import active_annotations, load_mask
from app.services.line.decisions import DECISION_KEY, calibrated_decision
from app.services.home_model import engine_config, feature_store, image_item, load_model, pool_rows
from app.services.loop.version_change import CHANGE_KEY, EVALUATION_SET_KEY, evaluation_fingerprint, measure_change
from db.engine import write_transaction
from db.models import Image, ModelVersion
from db.repositories import build_trained_on, record_metrics, store_pool_scores, untouched_ground_truth
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
    re-ranked after the promotion (app/services/loop/reranking.py)."""

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
    untouched = untouched_ground_truth()
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
    """Train, evaluate and publish one version, then promote it: the steps below, in order, with a
    checkpoint between them (a worker that lost its job stops there and publishes nothing).

    Args:
        home: the home whose database and settings say what to train on.
        sessions: its database.
        warm_start: update the active version (from scratch when there is none).
        job_id: the job that runs it (recorded with the version).
        progress: (fraction, message) reports.
        checkpoint: called before each step that publishes; raises to stop.

    Returns:
        What was trained: the version's name and id, the mode, timings, metrics and training counts.
    """
    t_start = time.perf_counter()
    settings = home.load_settings()
    with sessions() as session:
        _fail_stale_candidates(session, job_id)
        data = gather_training_data(session, home)
        parent = versions.active_version(session)
    if not data.normal:
        raise Conflict("no normal training images; ingest category folders with `dmad ingest` first")
    seconds: dict[str, float] = {}
    mode: Literal["scratch", "warm_start"] = "warm_start" if warm_start and parent is not None else "scratch"
    t0 = time.perf_counter()
    model, before = fit_model(home, settings, data, parent if mode == "warm_start" else None, progress)
    seconds["train"] = round(time.perf_counter() - t0, 2)
    seconds.update({f"train_{k}": round(v, 2) for k, v in model.fitted().timings.items()})
    checkpoint("trained")

    t0 = time.perf_counter()
    predictions = score_evaluation_set(model, data.evaluation, progress)
    seconds["score"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    progress(0.9, f"evaluating on {len(data.evaluation)} images with ground truth")
    metrics = evaluate(model, data.evaluation, predictions)
    change = None
    if before is not None and parent is not None:  # the parent on the same images (its heat maps need the config only)
        after = [predictions[img.id] for img in data.evaluation]
        change = measure_change(parent.name, data.evaluation, before, after, model, data.trained_on,
                                evaluate(model, data.evaluation, dict(zip(predictions, before, strict=True))), metrics)
    seconds["evaluate"] = round(time.perf_counter() - t0, 2)
    checkpoint("publishing")

    progress(0.95, "publishing the new version")
    record = version_record(settings, model, mode, job_id)
    record[EVALUATION_SET_KEY] = evaluation_fingerprint(data.evaluation)  # which images the metrics are on
    record[CHANGE_KEY] = change  # what it bought against its parent (app/services/loop/version_change.py)
    name, version_id = publish_and_promote(home, sessions, settings, model, record, parent, data, metrics,
                                           predictions, message=f"{mode.replace('_', ' ')}; job {job_id}" if job_id else mode,
                                           seconds=seconds, started=t_start, checkpoint=checkpoint)
    progress(1.0, f"{name} is active")
    log.info("trained %s (%s) in %.1f s", name, mode, time.perf_counter() - t_start)
    return TrainingOutcome(name, version_id, mode, seconds, metrics, data.trained_on)


def fit_model(home: Home, settings: HomeSettings, data: TrainingData, parent: ModelVersion | None,
              progress: Progress = no_progress) -> tuple[DMAD, list[Prediction] | None]:
    """Step 1: the engine fitted on ``data``: ``parent`` loaded and updated (a warm start), or a new model
    fitted from scratch when there is no parent. Reports the first 60 % of the progress. A warm start first
    scores the evaluation set with the parent as it is: what the retrain bought is measured against that.

    Args:
        home: where the feature cache and the parent's folder are.
        settings: the home's settings (epochs, outlier textures).
        data: what the database holds now.
        parent: the version to warm-start from; None: from scratch.
        progress: (fraction, message) reports.

    Returns:
        The fitted model (not saved), and the parent's predictions of ``data.evaluation`` (None from scratch).
    """
    if parent is not None:
        progress(0.0, f"loading {parent.name}")
        model = load_model(home, parent)
        before = model.predict([image_item(img) for img in data.evaluation], progress_bar=False)
        model.update(data.annotations, data.confirmed_normals, epochs=settings.retrain_epochs,
                     progress=lambda f, m: progress(0.6 * f, m))
        return model, before
    config = engine_config(home)
    outliers = outlier_items(Path(settings.outliers_dir) if settings.outliers_dir else None,
                             N_PROCEDURAL_OUTLIERS, config.mapper.seed, config.bank.outlier_images_max)
    model = DMAD(config, feature_store(home, config))
    model.fit(data.normal + data.confirmed_normals, outliers, data.annotations,
              progress=lambda f, m: progress(0.6 * f, m))
    return model, None


def score_evaluation_set(model: DMAD, images: list[Image], progress: Progress = no_progress) -> dict[int, Prediction]:
    """Step 2: the new model's predictions of the bounded evaluation set (image id -> Prediction), from 60 to
    90 % of the progress."""
    progress(0.6, f"scoring {len(images)} evaluation images")
    predicted = model.predict([image_item(img) for img in images], progress=lambda f, m: progress(0.6 + 0.3 * f, m),
                              progress_bar=False)
    return {img.id: p for img, p in zip(images, predicted, strict=True)}


def version_record(settings: HomeSettings, model: DMAD, mode: str, job_id: int | None) -> dict[str, Any]:
    """Step 3: what the version's row records besides its files.

    Part of it is ``FittedState.summary()`` (thresholds, pre-annotation levels, validation scores, bank
    sizes), a copy of what ``model.json`` holds, taken here from the same state ``model.save`` writes:
    the row is written once and never changed, so the two cannot disagree. It is kept on the row because
    its readers must not load a version's banks to read a few numbers: Label Studio's tasks
    (``FittedState.mask_levels``, read by ``preannotation.proposed_mask``), the thresholds and the 0-1 percentile
    (``VALIDATION_SCORES_KEY``). The rest is the home's, not the model's: the calibrated OK/NG decision
    (from the home's false-alarm rate), the preset, the mode, the job and the engine's configuration.
    """
    state = model.fitted()
    return {
        "preset": settings.preset, "mode": mode, "job_id": job_id,
        **state.summary(),
        DECISION_KEY: calibrated_decision(state.validation_scores, settings.false_alarm_rate),
        "engine": model.config.to_dict(),
    }


def publish_and_promote(home: Home, sessions: sessionmaker[Session], settings: HomeSettings, model: DMAD,
                        record: dict[str, Any], parent: ModelVersion | None, data: TrainingData,
                        metrics: dict[str, dict[str, float | None]], predictions: dict[int, Prediction], *,
                        message: str, seconds: dict[str, float], started: float,
                        checkpoint: Checkpoint = _no_checkpoint) -> tuple[str, int]:
    """Step 4: the model saved into a temporary folder, published as a candidate with its metrics and the
    evaluation set's pool scores, then promoted (which queues the pool's re-ranking). Nothing half-written
    becomes active: a failure removes the folder, or marks the candidate failed.

    Args:
        home, sessions, settings: the home.
        model: the fitted model.
        record: ``version_record``'s dict; ``seconds`` (with the total since ``started``) is added to it.
        parent: the version it was trained from, if any.
        data: what it was trained on.
        metrics, predictions: the evaluation's.
        message: the version's message.
        seconds: the timings so far.
        started: ``time.perf_counter()`` when the training started.
        checkpoint: called before the promotion.

    Returns:
        The version's name and id.
    """
    with sessions() as session:
        name, tmp = versions.new_version_dir(home, session)
        version: ModelVersion | None = None
        try:
            model.save(tmp)
            seconds["total"] = round(time.perf_counter() - started, 2)
            record["seconds"] = seconds
            version = versions.commit_version(
                session, home, name, tmp, record, parent.id if parent else None, data.trained_on,
                status="candidate", message=message)
            scored_pool = [img for img in data.evaluation if img.role == "pool"]  # the re-ranking skips them
            with write_transaction(session):
                record_metrics(session, version.id, metrics)
                store_pool_scores(session, version.id,
                                  pool_rows(scored_pool, [predictions[img.id] for img in scored_pool]))
            checkpoint("promoting")
            versions.promote(session, version.id, settings.rerank_chunk_images)
        except BaseException:
            session.rollback()  # whatever read or write was still open when the failure came
            if version is None:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                _mark_failed(session, version.id)
            raise
    return name, version.id


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

