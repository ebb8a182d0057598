"""Re-ranking the pool under a newly active version, in chunks that any number of workers share.

Why it is apart from training: a retrain promotes as soon as it has trained and evaluated on a bounded set,
so an annotation reaches the line in the same time whatever the pool's size (docs/scaling.md). The pool's
ranking follows as 'rerank' jobs on the ordinary queue, below every other job's priority: a retrain never
waits for more than the one chunk a worker is running. The chunks that matter to an inspector go first: the
images the previous version ranked highest, then the images it never scored (the newest), then the rest.

Scores are never mixed: each pool score row carries the version that made it, the Review page shows only
the active version's, and says how far its re-ranking has got (`rerank_progress`). A newer promotion cancels
the older version's chunks (a running one learns it at its next heartbeat and publishes nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import and_, delete, exists, func, select
from sqlalchemy.orm import Session, aliased, selectinload, sessionmaker

from app.home_folder import Home
from db.engine import write_transaction
from db.models import Image, Job, ModelVersion, PoolScore
from db.queue import OPEN_STATUSES, JobType, RerankChunk, cancel_open, enqueue_many
from db.repositories import store_pool_scores

if TYPE_CHECKING:  # the engine (PyTorch) is imported by the worker only: promotion and the UI stay light
    from app.services.line.inference import LoadedModel
    from dmad_core.model import DMAD, Progress

log = logging.getLogger(__name__)

RERANK_PRIORITY = -10  # below every other job: a retrain or a Label Studio sync is claimed first


def rerank_order(session: Session, version_id: int, previous_id: int | None, first: int) -> list[int]:
    """The pool images `version_id` has not scored yet, in the order an inspector needs them: the `first`
    images ranked highest under `previous_id`, then the images it never scored (newest first), then the rest
    by its ranking."""
    previous = aliased(PoolScore)
    rows = session.execute(
        select(Image.id, previous.score).select_from(Image)
        .outerjoin(previous, and_(previous.image_id == Image.id, previous.version_id == previous_id))
        .where(Image.role == "pool",
               ~exists().where(PoolScore.image_id == Image.id, PoolScore.version_id == version_id))
    ).all()
    ranked = sorted((r for r in rows if r[1] is not None), key=lambda r: (-r[1], r[0]))
    unranked = sorted((r[0] for r in rows if r[1] is None), reverse=True)
    ranked_ids = [r[0] for r in ranked]
    return ranked_ids[:first] + unranked + ranked_ids[first:]


def plan_rerank(session: Session, version: ModelVersion, previous_id: int | None, chunk_images: int) -> int:
    """Cancel every open re-ranking chunk and queue the chunks of `version` (in the caller's transaction:
    the promotion and its re-ranking plan commit together, or neither does); returns the chunks queued."""
    if chunk_images < 1:
        raise ValueError("chunk_images must be at least 1")
    cancel_open(session, f"superseded: {version.name} is active", type=JobType.RERANK)
    order = rerank_order(session, version.id, previous_id, chunk_images)
    chunks = [order[i:i + chunk_images] for i in range(0, len(order), chunk_images)]
    enqueue_many(session, JobType.RERANK, [RerankChunk(version_id=version.id, version=version.name, image_ids=ids,
                                                       chunk=k, chunks=len(chunks)) for k, ids in enumerate(chunks, start=1)],
                 priority=RERANK_PRIORITY)
    if chunks:
        log.info("re-ranking %d pool images under %s in %d chunks", len(order), version.name, len(chunks))
    return len(chunks)


def pool_features_fit(home: Home, session: Session, model: DMAD) -> bool:
    """Whether the patch features of every image of the home (the pool with the protected training and
    annotated images) fit in the feature cache's budget. When they do, a re-ranking stores the pool's features
    and the next one reads them back; when they do not, it stores none: a re-ranking reads the pool in one
    pass, so under LRU the entry it needs next is always the oldest, and stored features would be evicted
    before any use."""
    budget = home.load_settings().feature_cache_max_bytes
    if budget is None:
        return True
    sample = session.scalar(select(Image.content_hash).where(Image.role == "train_normal").limit(1))
    path = None if sample is None else model.features.cache.path_for(sample)
    if path is None or not path.exists():
        return True
    n_images = session.scalar(select(func.count(Image.id))) or 0
    return int(n_images) * path.stat().st_size <= budget


def rerank_chunk(home: Home, sessions: sessionmaker[Session], job_id: int, payload: RerankChunk, loaded: LoadedModel,
                 progress: Progress | None = None, checkpoint: Callable[[str], None] = lambda m: None) -> str:
    """Score one chunk of pool images under its version and store the scores; returns what it did. The
    worker that stores the last open chunk removes the pool scores of versions no longer kept."""
    from app.services.home_model import image_item, pool_rows

    progress = progress or (lambda fraction, message: None)
    version_id, ids = payload.version_id, payload.image_ids
    where = f"chunk {payload.chunk} of {payload.chunks}"
    with sessions() as session:
        version = session.get(ModelVersion, version_id)
        if version is None or version.status != "active":
            return f"skipped {where}: {payload.version} is no longer active"
        images = _pool_images(session, ids)
        session.expunge_all()
    model = loaded.get(home, version)
    with sessions() as session:
        store = pool_features_fit(home, session, model)
    progress(0.0, f"re-ranking {where} under {version.name}")
    predictions = model.predict([image_item(img) for img in images], progress=progress, progress_bar=False,
                                cache_features=store)
    checkpoint(f"storing {where}")
    with sessions() as session, write_transaction(session):
        store_pool_scores(session, version_id, pool_rows(images, predictions))
        last = session.scalar(select(Job.id).where(Job.type == JobType.RERANK, Job.status.in_(OPEN_STATUSES),
                                                   Job.id != job_id).limit(1)) is None
    _refresh_label_tasks(home, sessions, [img.id for img in images])
    if last:
        with sessions() as session, write_transaction(session):
            pruned = prune_pool_scores(session, home.load_settings().pool_score_versions_kept)
        if pruned:
            log.info("pool scores of %d old versions removed", pruned)
    return f"{len(images)} pool images re-ranked under {version.name} ({where})"


def _refresh_label_tasks(home: Home, sessions: sessionmaker[Session], image_ids: Sequence[int]) -> None:
    """The chunk's images waiting in Label Studio get the new version's proposal now; a failure (Label Studio
    down) is logged, never the chunk's: the worker's periodic sync refreshes what is still stale."""
    from app.services.labelstudio.home import has_project
    from app.services.labelstudio.tasks import refresh_tasks

    if not has_project(home):
        return
    try:
        refreshed = refresh_tasks(home, sessions, image_ids)
    except Exception as exc:  # noqa: BLE001 - Label Studio's and the network's errors alike
        log.warning("could not refresh the Label Studio tasks of this chunk (the next sync will): %s", exc)
        return
    if refreshed:
        log.info("%d Label Studio tasks now show the active version's proposal", refreshed)


def _pool_images(session: Session, ids: Sequence[int]) -> list[Image]:
    """The chunk's images still in the pool (retention may have removed some since it was planned)."""
    found: dict[int, Image] = {}
    for i in range(0, len(ids), 500):
        for img in session.scalars(select(Image).options(selectinload(Image.category))
                                   .where(Image.id.in_(ids[i:i + 500]), Image.role == "pool")):
            found[img.id] = img
    return [found[i] for i in ids if i in found]


def prune_pool_scores(session: Session, keep: int) -> int:
    """Delete the pool scores of all but `keep` versions (the active one, then the most recently activated
    or created); returns how many versions lost theirs. Inspect's score history then spans the kept ones."""
    keep = max(1, keep)
    scored = select(PoolScore.version_id).where(PoolScore.version_id == ModelVersion.id).exists()
    ranked = list(session.scalars(
        select(ModelVersion.id).where(scored)
        .order_by((ModelVersion.status == "active").desc(), func.coalesce(ModelVersion.activated_at,
                                                                          ModelVersion.created_at).desc(),
                  ModelVersion.id.desc())))
    drop = ranked[keep:]
    for version_id in drop:
        session.execute(delete(PoolScore).where(PoolScore.version_id == version_id))
    return len(drop)


@dataclass(frozen=True)
class RerankProgress:
    """How far the active version's ranking of the pool has got."""

    version_id: int
    scored: int  # pool images with a score of this version
    pool: int  # pool images
    chunks_open: int  # re-ranking chunks queued or running
    chunks_failed: int  # chunks that failed for good since the version became active

    @property
    def complete(self) -> bool:
        return self.scored >= self.pool


def rerank_progress(session: Session, version_id: int) -> RerankProgress:
    """How much of the pool the version has ranked so far (its re-ranking runs after its promotion)."""
    version = session.get(ModelVersion, version_id)
    pool = session.scalar(select(func.count(Image.id)).where(Image.role == "pool")) or 0
    scored = session.scalar(select(func.count(PoolScore.id)).join(Image, Image.id == PoolScore.image_id)
                            .where(PoolScore.version_id == version.id, Image.role == "pool")) or 0
    open_ = session.scalar(select(func.count(Job.id)).where(Job.type == JobType.RERANK, Job.status.in_(OPEN_STATUSES))) or 0
    failed = 0
    if version.activated_at is not None:
        failed = session.scalar(select(func.count(Job.id)).where(
            Job.type == JobType.RERANK, Job.status == "failed", Job.created_at >= version.activated_at)) or 0
    return RerankProgress(version.id, int(scored), int(pool), int(open_), int(failed))
