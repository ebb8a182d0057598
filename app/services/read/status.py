"""What `dmad status` and `dmad versions` report: plain dictionaries, ready for JSON, built from the
read models of `app.services.read.read_models` (the same the UI shows)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.home_folder import Home
from app.services.read.read_models import JobInfo, VersionInfo, active_version_info, job_info
from app.services.loop.reranking import rerank_progress
from app.services.loop.version_change import change_report
from db.models import JOB_STATUSES, Job
from db.queue import JobType, list_jobs
from db.repositories import metric_history, training_counts


def version_dict(v: VersionInfo) -> dict[str, Any]:
    """A version as `dmad status` / `dmad versions` print it in JSON."""
    return {"id": v.id, "name": v.name, "status": v.status, "mode": v.mode,
            "created_at": v.created_at, "activated_at": v.activated_at, "parent_id": v.parent_id,
            "annotations": v.annotations, "trained_on": v.trained_on, "seconds": v.seconds, "message": v.message,
            "folder": v.folder, "scorer": (v.config.get("engine") or {}).get("score", {}).get("scorer")}


def job_dict(job: JobInfo) -> dict[str, Any]:
    """A job as `dmad status` prints it in JSON."""
    return {"id": job.id, "type": job.type, "status": job.status, "progress": job.progress,
            "message": job.message, "attempts": job.attempts, "max_attempts": job.max_attempts,
            "error": job.error, "created_at": job.created_at, "started_at": job.started_at,
            "finished_at": job.finished_at}


def metrics_by_category(session: Session) -> dict[str, list[dict[str, Any]]]:
    """{category: [{"version", "version_id", "values": {metric: value}}, ...]}, oldest version first."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in metric_history(session):
        history = out.setdefault(row.category, [])
        if not history or history[-1]["version_id"] != row.version_id:
            history.append({"version": row.version, "version_id": row.version_id, "values": {}})
        history[-1]["values"][row.name] = row.value
    return out


def home_status(home: Home, sessions: sessionmaker[Session]) -> dict[str, Any]:
    with sessions() as session:
        active = active_version_info(session)
        counts = dict(session.execute(select(Job.status, func.count(Job.id)).group_by(Job.status)).all())
        return {
            "home": str(home.root),
            "scorer": home.load_settings().scorer,  # what the next training uses (`dmad init --scorer`)
            "active_version": version_dict(active) if active else None,
            "queue": {**{s: counts.get(s, 0) for s in JOB_STATUSES},
                      # re-ranking chunks (hundreds a version) are summed up in "pool_ranking" unless they failed
                      "recent": [job_dict(job_info(j)) for j in list_jobs(session, limit=10,
                                                                         hide_unless_failed=(JobType.RERANK,))]},
            "pool_ranking": _pool_ranking(session, active),
            "change": None if active is None else change_report(session, active.id),
            "metrics": metrics_by_category(session),
            "training_data": training_counts(session),
        }


def _pool_ranking(session: Session, active: VersionInfo | None) -> dict[str, Any] | None:
    """How much of the pool the active version has ranked (its re-ranking runs after its promotion)."""
    if active is None:
        return None
    p = rerank_progress(session, active.id)
    return {"version": active.name, "scored": p.scored, "pool": p.pool, "chunks_open": p.chunks_open,
            "chunks_failed": p.chunks_failed, "complete": p.complete}
