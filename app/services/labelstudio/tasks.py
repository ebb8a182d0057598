"""Send pool images to Label Studio as tasks, with the model's heat map as pre-annotation, and keep the
proposal of the tasks still waiting for an inspector that of the active version (``refresh_tasks``).

One path for `dmad labelstudio push` (the active version's top N, :func:`push_top`) and for images an
inspector picked in the UI (:func:`send_images`): items built from the active version's pool scores,
the heat map thresholded at the version's `pixel_threshold`, `annotation.project.push_tasks` for
idempotent creation. Both record the tasks in the database (`label_tasks`), so that Review can mark the
images waiting in Label Studio; the UI's path also returns each image's task id, to link straight to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, contains_eager, sessionmaker

from app.home_folder import Home
from app.services.labelstudio.home import (
    PIXEL_THRESHOLD_KEY,
    Connection,
    connect,
    webhook_base_url,
)
from app.services.read.read_models import normal_percentile_of
from app.services.loop.versions import version_or_active
from db.engine import write_transaction
from db.models import Annotation, Image, LabelTask, ModelVersion, PoolScore
from db.repositories import record_label_tasks, top_pool_scores
from dmad_core.config import DMADConfig
from dmad_core.errors import Conflict, Invalid

if TYPE_CHECKING:
    from annotation.project import TaskItem


@dataclass(frozen=True)
class SentTask:
    image_id: int
    task_id: int | None
    link: str | None  # <labelstudio url>/projects/<pid>/data?task=<id>


@dataclass(frozen=True)
class PushTopResult:
    created: int
    skipped_existing: int
    project_id: int
    model_version: str
    pre_annotation_masks: bool  # False when the version records no pixel threshold


@dataclass(frozen=True)
class SendResult:
    created: int
    skipped_existing: int
    project_id: int
    model_version: str
    pre_annotation_masks: bool  # False when the version records no pixel threshold
    tasks: list[SentTask]


def task_items(version: ModelVersion, rows: Sequence[PoolScore], image_base_url: str) -> list[TaskItem]:
    """One task item per pool score row (each with `image` and its category loaded)."""
    from annotation.project import TaskItem, image_url_for
    from app.services.home_model import image_item  # the engine's imports: loaded when tasks are made
    from dmad_core.preannotation import proposed_mask

    levels = version.config or {}  # the version's copy of its model's mask levels (FittedState.summary)
    engine = levels.get("engine")  # the version's DMADConfig: its heat maps' sigma and size
    config = DMADConfig.from_dict(engine) if engine else None
    return [
        TaskItem(
            image_id=row.image.id, content_hash=row.image.content_hash, category=row.image.category.name,
            image_url=image_url_for(image_base_url, row.image.content_hash), width=row.image.width,
            height=row.image.height, score=float(row.score), model_version=version.name,
            heatmap_mask=proposed_mask(levels, row.patch_map_array(), row.image.height, row.image.width,
                                       row.image.category.name, config, image_item(row.image).try_load),
            normal_percentile=normal_percentile_of(version.config, row.image.category.name, float(row.score)),
        )
        for row in rows
    ]


def task_ids(client: Any, project_id: int, content_hashes: set[str]) -> dict[str, int]:
    """Task id by content hash, for the given hashes (the project's task list is paged through once)."""
    found: dict[str, int] = {}
    from annotation.project import iter_tasks

    for task in iter_tasks(client, project_id):
        value = (task.data or {}).get("content_hash")
        if value in content_hashes and value not in found:
            found[value] = int(task.id)
    return found


def send_images(session: Session, home: Home, image_ids: Sequence[int]) -> SendResult:
    """Create a task for each image not yet in the project, scored by the active version."""
    from annotation.project import push_tasks

    if not image_ids:
        raise Invalid("select at least one image first")
    version = version_or_active(session)
    rows = list(session.scalars(
        select(PoolScore).join(PoolScore.image).options(contains_eager(PoolScore.image).joinedload(Image.category))
        .where(PoolScore.version_id == version.id, PoolScore.image_id.in_([int(i) for i in image_ids]))
        .order_by(PoolScore.score.desc())))
    if not rows:
        raise Conflict(f"model {version.name} has not scored the selected images")
    connection: Connection = connect(home)
    items = task_items(version, rows, webhook_base_url(home))
    result = push_tasks(connection.client, connection.project_id, items,
                        label=home.load_settings().defect_labels[0])
    ids = task_ids(connection.client, connection.project_id, {item.content_hash for item in items})
    with write_transaction(session):
        record_label_tasks(session, connection.project_id, version.name,
                           [(item.image_id, ids.get(item.content_hash)) for item in items])
    tasks = []
    for item in items:
        task_id = ids.get(item.content_hash)
        link = None if task_id is None else f"{connection.url}/projects/{connection.project_id}/data?task={task_id}"
        tasks.append(SentTask(item.image_id, task_id, link))
    return SendResult(result.created, result.skipped_existing, connection.project_id, version.name,
                      (version.config or {}).get(PIXEL_THRESHOLD_KEY) is not None, tasks)


def push_top(home: Home, sessions: sessionmaker[Session], limit: int = 50, category: str | None = None,
             min_score: float | None = None) -> PushTopResult:
    """Create tasks for the active version's highest-scoring pool images that have no annotation yet
    (those already in the project are skipped)."""
    from annotation.project import push_tasks

    connection = connect(home)
    client, project_id = connection.client, connection.project_id
    with sessions() as session:
        version = version_or_active(session)
        rows = top_pool_scores(session, version.id, limit=limit, category=category, min_score=min_score,
                               unannotated=True)
        if not rows:
            raise Conflict(f"model {version.name} has no unannotated pool images to send "
                           "(all are annotated, or none match the filters)")
        items = task_items(version, rows, webhook_base_url(home))
    result = push_tasks(client, project_id, items, label=home.load_settings().defect_labels[0])
    ids = task_ids(client, project_id, {item.content_hash for item in items})
    with sessions() as session, write_transaction(session):
        record_label_tasks(session, project_id, version.name,
                           [(item.image_id, ids.get(item.content_hash)) for item in items])
    return PushTopResult(result.created, result.skipped_existing, project_id, version.name,
                         (version.config or {}).get(PIXEL_THRESHOLD_KEY) is not None)


def stale_tasks(session: Session, version: ModelVersion, image_ids: Sequence[int] | None = None) -> list[PoolScore]:
    """The pool scores of ``version`` for images whose Label Studio task carries an older version's
    proposal and that no inspector has annotated yet (``image_ids``: only those images)."""
    annotated = select(Annotation.id).where(Annotation.image_id == LabelTask.image_id, Annotation.deleted_at.is_(None))
    query = (select(PoolScore).join(PoolScore.image).join(LabelTask, LabelTask.image_id == PoolScore.image_id)
             .options(contains_eager(PoolScore.image).joinedload(Image.category))
             .where(PoolScore.version_id == version.id, LabelTask.task_id.is_not(None),
                    LabelTask.model_version != version.name, ~annotated.exists())
             .order_by(PoolScore.image_id))
    if image_ids is not None:
        query = query.where(PoolScore.image_id.in_([int(i) for i in image_ids]))
    return list(session.scalars(query).unique())


def refresh_tasks(home: Home, sessions: sessionmaker[Session], image_ids: Sequence[int] | None = None) -> int:
    """Replace the proposal (mask, score) of every task still waiting in Label Studio by the active
    version's, where that version has scored the image: what a re-ranking chunk does for its images after
    a promotion, and the periodic sync for any it missed (Label Studio down then). Returns the tasks
    refreshed; ``Unavailable`` when Label Studio is not answering."""
    from annotation.project import replace_prediction

    from app.services.loop.versions import active_version

    with sessions() as session:
        version = active_version(session)
        rows = [] if version is None else stale_tasks(session, version, image_ids)
        if not rows:
            return 0
        items = task_items(version, rows, webhook_base_url(home))
        name = version.name
    connection = connect(home)
    tasks = dict(sessions_task_ids(sessions, connection.project_id, [item.image_id for item in items]))
    label = home.load_settings().defect_labels[0]
    refreshed = []
    for item in items:
        task_id = tasks.get(item.image_id)
        if task_id is not None:
            replace_prediction(connection.client, task_id, item, label)
            refreshed.append(item.image_id)
    with sessions() as session, write_transaction(session):
        for row in session.scalars(select(LabelTask).where(LabelTask.project_id == connection.project_id,
                                                          LabelTask.image_id.in_(refreshed))):
            row.model_version = name
    return len(refreshed)


def sessions_task_ids(sessions: sessionmaker[Session], project_id: int, image_ids: Sequence[int]) -> list[tuple[int, int]]:
    """(image id, task id) of the images' recorded tasks in the project."""
    with sessions() as session:
        return [(int(i), int(t)) for i, t in session.execute(
            select(LabelTask.image_id, LabelTask.task_id).where(
                LabelTask.project_id == project_id, LabelTask.image_id.in_(list(image_ids)),
                LabelTask.task_id.is_not(None)))]
