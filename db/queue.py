"""The job queue: a table, leases and heartbeats.

A worker `claim`s the oldest claimable job under a lease and extends it with `heartbeat`; if the worker
dies, the lease expires and another worker takes the job over (up to `max_attempts` attempts in all).
On PostgreSQL concurrent claimers skip each other's rows (`FOR UPDATE SKIP LOCKED`); on SQLite a claim
takes the single write lock up front (`BEGIN IMMEDIATE`), which serialises claimers and is just as correct.

Functions that take a `session_factory` run and commit their own short transaction; `enqueue`,
`enqueue_many`, `cancel_open` and `list_jobs` take the caller's session so that they are part of the
caller's transaction.

The rules of the queue live here: the job types (`JobType`), the typed payload each one carries (`PAYLOADS`;
read back with `payload_of`), one cancellation (`cancel_open`, which `cancel` uses too), and the result a
job leaves (`complete(..., result=)`, in the job's `result` column, never mixed into its payload).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db.engine import write_transaction
from db.models import Job, utcnow


class JobType(StrEnum):
    """What a job does (the `jobs.type` column holds the value)."""

    TRAIN = "train"  # a version from scratch
    RETRAIN = "retrain"  # warm start from the active version; annotations coalesce into one
    RERANK = "rerank"  # one chunk of the pool scored under the active version
    SCORE_UPLOAD = "score_upload"  # one uploaded image; its score is the job's result
    LABELSTUDIO_SYNC = "labelstudio_sync"  # pull the annotations the webhook missed


OPEN_STATUSES = ("queued", "running")  # a job that may still run


class JobPayload(BaseModel):
    """What a job is given, stored as JSON in `jobs.payload`; each job type has its own record (`PAYLOADS`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Trigger(JobPayload):
    """Train, retrain and sync jobs carry only who asked: 'cli', 'ui', 'annotations', 'periodic'..."""

    trigger: str


class RerankChunk(JobPayload):
    """One chunk of a version's re-ranking of the pool (app/services/loop/reranking.py plans them)."""

    version_id: int
    version: str  # its name, for messages
    image_ids: list[int]
    chunk: int  # 1-based
    chunks: int


class UploadToScore(JobPayload):
    """An uploaded image to score under the active version."""

    path: str
    category: str


PAYLOADS: dict[JobType, type[JobPayload]] = {
    JobType.TRAIN: Trigger,
    JobType.RETRAIN: Trigger,
    JobType.RERANK: RerankChunk,
    JobType.SCORE_UPLOAD: UploadToScore,
    JobType.LABELSTUDIO_SYNC: Trigger,
}


def _stored(type: JobType, payload: JobPayload) -> dict[str, Any]:
    """The payload's JSON, after checking that it is the record its job type takes."""
    expected = PAYLOADS[JobType(type)]
    if not isinstance(payload, expected):
        raise TypeError(f"a {type} job takes a {expected.__name__} payload, not {payload.__class__.__name__}")
    return payload.model_dump(mode="json")


def payload_of(job: Job) -> JobPayload:
    """The job's payload as its type's record; ValueError naming the job for an unknown type or a payload
    that does not fit it."""
    try:
        return PAYLOADS[JobType(job.type)].model_validate(job.payload or {})
    except ValueError as exc:  # pydantic's ValidationError is a ValueError too
        raise ValueError(f"job {job.id} ({job.type}): {exc}") from exc


@contextmanager
def _write(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """One committed write transaction (IMMEDIATE on SQLite); rolled back on error."""
    with session_factory() as session, write_transaction(session):
        yield session


def _detach(session: Session, job: Job) -> Job:
    """Loaded and detached, so the caller can read it after the session closes."""
    session.refresh(job)
    session.expunge(job)
    return job


def enqueue(session: Session, type: JobType, payload: JobPayload, coalesce_key: str | None = None,
            max_attempts: int = 3, priority: int = 0) -> Job:
    """Add a job in the caller's transaction (flushed, not committed); `payload` is the record its type
    takes (`PAYLOADS`), else TypeError.

    With a `coalesce_key`, a job with that key still waiting ('queued') is returned instead of a new
    one: the retrain job reads every annotation when it starts, so a burst of annotations needs one
    retrain, and while one runs at most one more waits. A unique partial index backs this up against
    concurrent enqueuers; the loser of that race gets the winner's job.

    `priority`: claimers take higher priorities first, then the oldest job; background work (the
    pool's re-ranking chunks) is enqueued below 0 so that an annotation's retrain never waits behind it.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    stored = _stored(type, payload)
    for _ in range(3):
        if coalesce_key is not None:
            # Locked until the caller commits: a claimer (SKIP LOCKED) then cannot start this job before
            # the caller's data (the annotation that asked for the retrain) is visible to it, and a claimer
            # that got there first makes the row stop matching, so a new job is queued instead.
            waiting = session.scalars(
                select(Job).where(Job.coalesce_key == coalesce_key, Job.status == "queued").limit(1)
                .with_for_update()
            ).first()
            if waiting is not None:
                return waiting
        job = Job(type=str(type), status="queued", payload=stored, coalesce_key=coalesce_key,
                  max_attempts=max_attempts, attempts=0, progress=0.0, message="queued", priority=priority)
        try:
            with session.begin_nested():
                session.add(job)
        except IntegrityError:
            if coalesce_key is None:
                raise
            continue  # a concurrent enqueuer won: read its job
        return job
    raise RuntimeError(f"could not enqueue job with coalesce key {coalesce_key!r}")


def enqueue_many(session: Session, type: JobType, payloads: Sequence[JobPayload], priority: int = 0,
                 max_attempts: int = 3) -> int:
    """Add many jobs without a coalesce key in the caller's transaction, in one executemany (a promotion
    queues hundreds of re-ranking chunks: one flush each would cost a noticeable part of a second); they
    are claimed in the order given. Returns how many were added."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    now = utcnow()
    rows = [{"type": str(type), "status": "queued", "payload": _stored(type, p), "coalesce_key": None, "priority": priority,
             "max_attempts": max_attempts, "attempts": 0, "lease_expiries": 0, "progress": 0.0, "message": "queued",
             "created_at": now + timedelta(microseconds=k)} for k, p in enumerate(payloads)]
    if rows:
        session.execute(insert(Job), rows)
    return len(rows)


def _expired_running(now: datetime) -> Any:
    return and_(Job.status == "running", Job.lease_expires_at.is_not(None), Job.lease_expires_at < now)


def reap_expired(session_factory: sessionmaker[Session]) -> int:
    """Fail running jobs whose worker died on their last allowed attempt; returns how many."""
    with _write(session_factory) as session:
        return _reap(session, utcnow())


def _reap(session: Session, now: datetime) -> int:
    dead = session.scalars(
        select(Job).where(_expired_running(now), Job.attempts >= Job.max_attempts)
        .with_for_update(skip_locked=True)
    ).all()
    for job in dead:
        job.lease_expiries += 1
        last = job.error or f"none recorded (last progress message: {job.message!r})"
        job.status = "failed"
        times = "1 time" if job.lease_expiries == 1 else f"{job.lease_expiries} times"
        job.error = f"worker died {times}; last error: {last}"
        job.message = f"failed: worker {job.lease_owner} stopped heartbeating on attempt {job.attempts}"
        job.finished_at = now
        job.lease_owner = None
        job.lease_expires_at = None
    return len(dead)


def claim(session_factory: sessionmaker[Session], worker_id: str, types: Sequence[str] | None = None,
          lease_seconds: float = 60) -> Job | None:
    """Claim the claimable job of highest priority (the oldest among equals) for `worker_id`, or None.

    Claimable: 'queued', or 'running' with an expired lease and attempts left (its worker died).
    The returned job is detached; it is 'running', owned by `worker_id` until its lease expires.
    """
    with _write(session_factory) as session:
        now = utcnow()
        _reap(session, now)
        query = (
            select(Job)
            .where(or_(Job.status == "queued", and_(_expired_running(now), Job.attempts < Job.max_attempts)))
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if types is not None:
            query = query.where(Job.type.in_(list(types)))
        job = session.scalars(query).first()
        if job is None:
            return None
        if job.status == "running":  # taking over from a dead worker
            job.lease_expiries += 1
            job.message = f"retrying: worker {job.lease_owner} stopped heartbeating"
        else:
            job.message = "started"
        job.status = "running"
        job.attempts += 1
        job.lease_owner = worker_id
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        job.started_at = now
        job.heartbeat_at = now
        job.finished_at = None
        session.flush()
        return _detach(session, job)


def _owned(session: Session, job_id: int, worker_id: str) -> Job | None:
    return session.scalars(
        select(Job).where(Job.id == job_id, Job.status == "running", Job.lease_owner == worker_id)
        .with_for_update()
    ).first()


def heartbeat(session_factory: sessionmaker[Session], job_id: int, worker_id: str, progress: float,
              message: str, lease_seconds: float = 60) -> bool:
    """Report progress and extend the lease. False means stop: the job was cancelled, or its lease
    expired and another worker took it over."""
    with _write(session_factory) as session:
        job = _owned(session, job_id, worker_id)
        if job is None:
            return False
        now = utcnow()
        job.progress = min(1.0, max(0.0, float(progress)))
        job.message = message
        job.heartbeat_at = now
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        return True


def complete(session_factory: sessionmaker[Session], job_id: int, worker_id: str,
             message: str = "done", result: dict[str, Any] | None = None) -> bool:
    """Mark the job succeeded, with its `result` (JSON, e.g. an upload's score) in the same transaction;
    False if this worker no longer owns it (its result is then discarded)."""
    with _write(session_factory) as session:
        job = _owned(session, job_id, worker_id)
        if job is None:
            return False
        job.result = result
        job.status = "succeeded"
        job.progress = 1.0
        job.message = message
        job.finished_at = utcnow()
        job.lease_owner = None
        job.lease_expires_at = None
        return True


def fail(session_factory: sessionmaker[Session], job_id: int, worker_id: str, error: str) -> bool:
    """Record a failed attempt: back to 'queued' while attempts remain, else 'failed'. The error is
    kept either way. A job whose coalesce key already has a waiting job fails for good instead, since
    that job will redo the work. False if this worker no longer owns the job."""
    with _write(session_factory) as session:
        job = _owned(session, job_id, worker_id)
        if job is None:
            return False
        now = utcnow()
        job.error = error
        job.lease_owner = None
        job.lease_expires_at = None
        if job.attempts < job.max_attempts and not _coalesced_elsewhere(session, job):
            job.status = "queued"
            job.message = f"attempt {job.attempts} of {job.max_attempts} failed; retrying"
        else:
            job.status = "failed"
            job.finished_at = now
            if job.attempts < job.max_attempts:
                job.message = "failed; a newer job with the same coalesce key is already queued"
            else:
                job.message = f"failed after {job.attempts} attempts"
        return True


def _coalesced_elsewhere(session: Session, job: Job) -> bool:
    """True when another job with the same key already waits: it will redo this job's work."""
    if job.coalesce_key is None:
        return False
    other = session.scalars(
        select(Job.id).where(Job.coalesce_key == job.coalesce_key, Job.status == "queued", Job.id != job.id)
    ).first()
    return other is not None


def cancel_open(session: Session, message: str, *, job_id: int | None = None, type: JobType | None = None) -> int:
    """Cancel the open (queued or running) jobs with that id or of that type, in the caller's transaction
    (a running worker learns it from its next heartbeat); returns how many were cancelled."""
    if job_id is None and type is None:
        raise ValueError("cancel_open needs a job id or a job type")
    query = update(Job).where(Job.status.in_(OPEN_STATUSES))
    if job_id is not None:
        query = query.where(Job.id == job_id)
    if type is not None:
        query = query.where(Job.type == str(type))
    done = session.execute(query.values(status="cancelled", message=message, finished_at=utcnow(), lease_owner=None,
                                        lease_expires_at=None).execution_options(synchronize_session=False))
    return int(getattr(done, "rowcount", 0) or 0)


def cancel(session_factory: sessionmaker[Session], job_id: int, message: str = "cancelled") -> bool:
    """Cancel a queued or running job in a transaction of its own. False if the job does not exist or has
    already finished."""
    with _write(session_factory) as session:
        return cancel_open(session, message, job_id=job_id) == 1


def list_jobs(session: Session, limit: int = 50, types: Sequence[str] | None = None,
              statuses: Sequence[str] | None = None, hide_succeeded: Sequence[str] = (),
              hide_unless_failed: Sequence[str] = ()) -> list[Job]:
    """Newest first, with progress and message, for the UI; ``hide_succeeded``: job types whose succeeded
    jobs are left out (routine ones, such as the once-a-minute Label Studio sync); ``hide_unless_failed``:
    job types shown only when they failed (the pool's re-ranking chunks, summed up elsewhere)."""
    query = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    if types is not None:
        query = query.where(Job.type.in_(list(types)))
    if statuses is not None:
        query = query.where(Job.status.in_(list(statuses)))
    if hide_succeeded:
        query = query.where(~and_(Job.type.in_(list(hide_succeeded)), Job.status == "succeeded"))
    if hide_unless_failed:
        query = query.where(~and_(Job.type.in_(list(hide_unless_failed)), Job.status != "failed"))
    return list(session.scalars(query))
