"""The one read model of each entity the product reports: what a version and a job look like to the
UI's pages and to `dmad status --json` alike (frozen dataclasses, readable after the session closes).

`app.services.read.ui_queries` returns these; `app.services.read.status` turns them into JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from app.services.loop.versions import active_version
from db.models import Job, ModelVersion
from dmad_core.items import normal_percentile

ACTIVE_JOB_STATUSES = ("queued", "running")


VALIDATION_SCORES_KEY = "validation_scores"  # in a version's config: class -> its validation image scores


def normal_percentile_of(config: dict[str, Any] | None, category: str, score: float) -> float | None:
    """The share of the class's validation normals that scored below ``score`` under the version whose
    ``config`` this is (None when it did not record them): the unit Review and Label Studio show scores in."""
    return normal_percentile(score, ((config or {}).get(VALIDATION_SCORES_KEY) or {}).get(category, ()))


@dataclass(frozen=True)
class VersionInfo:
    id: int
    name: str
    status: str
    created_at: datetime
    activated_at: datetime | None
    message: str
    trained_on: dict[str, Any]
    config: dict[str, Any]
    parent_id: int | None = None
    folder: str = ""

    @property
    def mode(self) -> str | None:
        """'scratch' or 'warm_start': how the version was trained."""
        return self.config.get("mode")

    @property
    def seconds(self) -> dict[str, float]:
        """Where the training's time went (stage -> seconds)."""
        return self.config.get("seconds", {})

    @property
    def annotations(self) -> int:
        """How many annotations the version learnt from."""
        return len(self.trained_on.get("annotation_ids", []))


def version_info(v: ModelVersion) -> VersionInfo:
    return VersionInfo(v.id, v.name, v.status, v.created_at, v.activated_at, v.message or "",
                       dict(v.trained_on or {}), dict(v.config or {}), v.parent_id, v.folder)


def active_version_info(session: Session) -> VersionInfo | None:
    """The active version's read model (the registry's `active_version` is the one query)."""
    version = active_version(session)
    return None if version is None else version_info(version)


@dataclass(frozen=True)
class JobInfo:
    id: int
    type: str
    status: str
    progress: float
    message: str
    attempts: int
    max_attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    payload: dict[str, Any]
    result: dict[str, Any] | None  # what the job left (an upload's score), once it succeeded

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_JOB_STATUSES


def job_info(job: Job) -> JobInfo:
    return JobInfo(job.id, job.type, job.status, float(job.progress or 0.0), job.message or "", job.attempts,
                   job.max_attempts, job.created_at, job.started_at, job.finished_at, job.error,
                   dict(job.payload or {}), job.result)
