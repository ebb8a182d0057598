"""Reconciliation: pull every annotation of the project and make the sink agree with Label Studio.

Webhooks are fire-and-forget (one try, about a second), so whatever the receiver missed while it was
down, slow or unreachable is picked up here. Each annotation is read by the same
:func:`annotation.parse.parse_annotation` as the webhook, and the sink's idempotence (external id +
updated time) makes a sync after a successful webhook a no-op.

Deletions: an annotation we hold that Label Studio no longer has, or that is now empty there (nothing
drawn, no verdict, or a skipped task), is deleted through the sink. An annotation that fails to parse
is reported and left as it is (it still exists in Label Studio). Nothing is deleted unless the whole
project was listed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

from label_studio_sdk import LabelStudio

from annotation.project import iter_tasks
from annotation.parse import PayloadError, annotation_id, parse_annotation, task_image_id
from annotation.sink import AnnotationSink, UnknownImageError
from dmad_core.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncReport:
    created: int
    updated: int
    unchanged: int
    deleted: int
    failed: tuple[str, ...] = ()  # one line per annotation that could not be stored, with the reason


def _as_dict(obj: Any) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else obj.model_dump()


def _task_annotations(client: LabelStudio, task: dict[str, Any]) -> list[dict[str, Any]]:
    """The task's annotations with their results (the task list carries them; older servers may not)."""
    listed = task.get("annotations")
    if isinstance(listed, list) and all(isinstance(a, dict) and "result" in a for a in listed):
        return listed
    if not (task.get("total_annotations") or task.get("cancelled_annotations")):
        return []
    return [_as_dict(a) for a in client.annotations.list(id=int(task["id"]))]


def iter_project_annotations(client: LabelStudio, project_id: int) -> Iterable[tuple[dict[str, Any], dict[str, Any]]]:
    """(annotation, task) for every annotation of every task of the project."""
    for raw_task in iter_tasks(client, project_id, fields="all"):
        task = _as_dict(raw_task)
        for annotation in _task_annotations(client, task):
            yield annotation, task


def sync_annotations(client: LabelStudio, project_id: int, sink: AnnotationSink) -> SyncReport:
    """Brings the sink in line with the project's annotations; see the module docstring."""
    counts = {"created": 0, "updated": 0, "unchanged": 0}
    failed: list[str] = []
    present: set[str] = set()
    for annotation, task in iter_project_annotations(client, project_id):
        where = f"annotation {annotation.get('id')} (task {task.get('id')})"
        try:
            external_id = annotation_id(annotation)
        except PayloadError as exc:
            failed.append(f"{where}: {exc}")
            continue
        try:
            image_id = task_image_id(task)
            size = sink.image_size(image_id)
            if size is None:
                raise UnknownImageError(f"image {image_id} is not known here")
            parsed = parse_annotation(annotation, task, image_size=size)
            if parsed.kind is None:
                continue  # empty in Label Studio: not present for us
            outcome = sink.record(image_id=parsed.image_id, kind=parsed.kind, mask=parsed.mask,
                                  external_id=parsed.external_id, updated_at=parsed.updated_at)
        except (PayloadError, UnknownImageError, UserError, ValueError) as exc:
            failed.append(f"{where}: {exc}")
            present.add(external_id)  # it exists; keep what we have
            continue
        present.add(external_id)
        counts[outcome if outcome in counts else "unchanged"] += 1
    deleted = 0
    for external_id in sorted(sink.known_external_ids() - present):
        if sink.delete(external_id=external_id):
            deleted += 1
    report = SyncReport(created=counts["created"], updated=counts["updated"], unchanged=counts["unchanged"],
                        deleted=deleted, failed=tuple(failed))
    log.info("sync of project %s: %s", project_id, report)
    return report
