"""The job queue on a real SQLite file. The `check_*` functions are shared with the PostgreSQL tests."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import queue
from db.models import Job
from tests.db_fixtures import sqlite_engine, sqlite_sf, sqlite_url  # noqa: F401


def payload(type: str, n: int = 0) -> queue.JobPayload:
    """A valid payload of the job type (the queue refuses any other)."""
    if type == queue.JobType.SCORE_UPLOAD:
        return queue.UploadToScore(path=f"/uploads/{n}.png", category="tiles")
    return queue.Trigger(trigger=f"test {n}")


def _enqueue(sf: sessionmaker[Session], type: str = "train", n: int = 0, **kwargs) -> int:
    with sf() as session:
        job = queue.enqueue(session, queue.JobType(type), payload(type, n), **kwargs)
        session.commit()
        return job.id


def _job(sf: sessionmaker[Session], job_id: int) -> Job:
    with sf() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def check_claim_order_and_types(sf: sessionmaker[Session]) -> None:
    ids = [_enqueue(sf, t, n=i) for i, t in enumerate(["train", "score_upload", "train", "retrain"])]
    first = queue.claim(sf, "w1")
    assert first is not None and first.id == ids[0]
    assert (first.status, first.attempts, first.lease_owner, first.payload) == ("running", 1, "w1", {"trigger": "test 0"})
    assert first.started_at is not None and first.lease_expires_at > first.started_at
    assert first.lease_expires_at.tzinfo is not None
    only_retrain = queue.claim(sf, "w1", types=["retrain"])
    assert only_retrain is not None and only_retrain.id == ids[3]
    assert [queue.claim(sf, "w2").id, queue.claim(sf, "w2").id] == [ids[1], ids[2]]
    assert queue.claim(sf, "w2") is None


def check_lease_expiry_lets_another_worker_take_over(sf: sessionmaker[Session]) -> None:
    job_id = _enqueue(sf, "retrain")
    # a long first lease, so that a slow machine cannot let it run out before the second claim
    job = queue.claim(sf, "dying-worker", lease_seconds=60)
    assert job is not None and job.id == job_id
    assert queue.claim(sf, "w2", lease_seconds=60) is None  # lease still held
    # the worker's last heartbeat asks for a short lease; then it dies
    assert queue.heartbeat(sf, job_id, "dying-worker", 0.1, "extracting features", lease_seconds=0.2) is True
    time.sleep(0.4)
    taken = queue.claim(sf, "w2", lease_seconds=30)
    assert taken is not None and taken.id == job_id
    assert (taken.attempts, taken.lease_owner, taken.lease_expiries) == (2, "w2", 1)
    # the first worker comes back: it no longer owns the job and must not touch it
    assert queue.heartbeat(sf, job_id, "dying-worker", 0.5, "still here?") is False
    assert queue.complete(sf, job_id, "dying-worker") is False
    assert queue.fail(sf, job_id, "dying-worker", "boom") is False
    assert queue.heartbeat(sf, job_id, "w2", 0.25, "training mapper") is True
    assert queue.complete(sf, job_id, "w2", "promoted v0002") is True
    done = _job(sf, job_id)
    assert (done.status, done.progress, done.message, done.lease_owner) == ("succeeded", 1.0, "promoted v0002", None)
    assert done.finished_at is not None


def check_workers_dying_on_every_attempt_fail_the_job(sf: sessionmaker[Session]) -> None:
    job_id = _enqueue(sf, "retrain", max_attempts=2)
    first = queue.claim(sf, "w1", lease_seconds=0.3)
    assert first is not None
    assert queue.fail(sf, job_id, "w1", "CUDA out of memory") is True  # attempt 1 failed: retried
    assert _job(sf, job_id).status == "queued"
    second = queue.claim(sf, "w2", lease_seconds=0.3)
    assert second is not None and second.attempts == 2
    assert queue.heartbeat(sf, job_id, "w2", 0.4, "extracting features", lease_seconds=0.3)
    time.sleep(0.5)  # w2 dies on the last allowed attempt
    assert queue.claim(sf, "w3") is None
    dead = _job(sf, job_id)
    assert dead.status == "failed"
    assert dead.error is not None and dead.error.startswith("worker died 1 time; last error: CUDA out of memory")
    assert dead.finished_at is not None and dead.lease_owner is None
    assert dead.progress == pytest.approx(0.4)


def check_death_without_error_reports_the_last_message(sf: sessionmaker[Session]) -> None:
    job_id = _enqueue(sf, "retrain", max_attempts=2)
    assert queue.claim(sf, "w1", lease_seconds=0.2) is not None
    time.sleep(0.3)
    assert queue.claim(sf, "w2", lease_seconds=0.2).attempts == 2
    queue.heartbeat(sf, job_id, "w2", 0.1, "building normal bank", lease_seconds=0.2)
    time.sleep(0.3)
    assert queue.reap_expired(sf) == 1
    dead = _job(sf, job_id)
    assert dead.status == "failed"
    assert dead.error == ("worker died 2 times; last error: none recorded "
                          "(last progress message: 'building normal bank')")


def check_fail_retries_then_gives_up(sf: sessionmaker[Session]) -> None:
    job_id = _enqueue(sf, "score_upload", max_attempts=3)
    for attempt in (1, 2, 3):
        job = queue.claim(sf, "w")
        assert job is not None and job.id == job_id and job.attempts == attempt
        assert queue.fail(sf, job_id, "w", f"error {attempt}")
        after = _job(sf, job_id)
        assert after.error == f"error {attempt}"
        assert after.status == ("queued" if attempt < 3 else "failed")
    assert queue.claim(sf, "w") is None
    assert _job(sf, job_id).finished_at is not None


def check_coalescing(sf: sessionmaker[Session]) -> None:
    with sf() as session:
        ids = {queue.enqueue(session, queue.JobType.RETRAIN, payload("retrain"), coalesce_key="retrain").id for _ in range(50)}
        session.commit()
    assert len(ids) == 1
    (first,) = ids
    running = queue.claim(sf, "w1")
    assert running is not None and running.id == first
    with sf() as session:  # while one runs, one more waits ...
        waiting = {queue.enqueue(session, queue.JobType.RETRAIN, payload("retrain"), coalesce_key="retrain").id for _ in range(50)}
        session.commit()
    assert len(waiting) == 1 and first not in waiting
    with sf() as session:
        statuses = Counter(session.scalars(select(Job.status).where(Job.coalesce_key == "retrain")))
    assert statuses == {"running": 1, "queued": 1}
    # ... and if the running one fails, the waiting one will redo its work: no second queued copy
    assert queue.fail(sf, first, "w1", "boom")
    assert _job(sf, first).status == "failed"
    with sf() as session:
        other = queue.enqueue(session, queue.JobType.SCORE_UPLOAD, payload("score_upload"), coalesce_key="score")  # other keys are independent
        session.commit()
    assert other.id not in waiting | {first}


def check_heartbeat_progress_and_list_jobs(sf: sessionmaker[Session]) -> None:
    a = _enqueue(sf, "train")
    b = _enqueue(sf, "score_upload")
    job = queue.claim(sf, "w1", lease_seconds=5)
    before = job.lease_expires_at
    time.sleep(0.01)
    assert queue.heartbeat(sf, a, "w1", 1.7, "scoring 10/12", lease_seconds=60)
    after = _job(sf, a)
    assert (after.progress, after.message) == (1.0, "scoring 10/12")  # progress clamped to 0..1
    assert after.lease_expires_at > before and after.heartbeat_at is not None
    with sf() as session:
        listed = queue.list_jobs(session, limit=10)
        assert [j.id for j in listed] == [b, a]  # newest first
        assert [j.id for j in queue.list_jobs(session, 10, statuses=["running"])] == [a]
        assert queue.list_jobs(session, limit=1)[0].id == b


def check_cancel(sf: sessionmaker[Session]) -> None:
    queued = _enqueue(sf, "score_upload")
    running = _enqueue(sf, "train")
    assert queue.claim(sf, "w1", types=["train"]).id == running
    assert queue.cancel(sf, queued) and queue.cancel(sf, running)
    assert queue.cancel(sf, running) is False  # already finished
    assert queue.cancel(sf, 999_999) is False
    assert queue.heartbeat(sf, running, "w1", 0.5, "x") is False  # the worker learns it must stop
    assert queue.claim(sf, "w2") is None
    assert {_job(sf, queued).status, _job(sf, running).status} == {"cancelled"}


CHECKS = [check_claim_order_and_types, check_lease_expiry_lets_another_worker_take_over,
          check_workers_dying_on_every_attempt_fail_the_job, check_death_without_error_reports_the_last_message,
          check_fail_retries_then_gives_up, check_coalescing, check_heartbeat_progress_and_list_jobs, check_cancel]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_queue_on_sqlite(check, sqlite_sf: sessionmaker[Session]) -> None:  # noqa: F811
    check(sqlite_sf)


def claim_concurrently(sf: sessionmaker[Session], n_jobs: int, n_workers: int) -> Counter:
    """Workers in threads claim and complete until the queue is empty; returns claims per job id."""
    with sf() as session:
        for i in range(n_jobs):
            queue.enqueue(session, queue.JobType.SCORE_UPLOAD, payload("score_upload", i))
        session.commit()
    claims: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(n_workers)

    def work(worker: str) -> None:
        try:
            start.wait()
            while (job := queue.claim(sf, worker, lease_seconds=60)) is not None:
                with lock:
                    claims.append(job.id)
                assert queue.complete(sf, job.id, worker)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return Counter(claims)


def test_concurrent_claims_on_sqlite_never_share_a_job(sqlite_sf) -> None:  # noqa: F811
    counts = claim_concurrently(sqlite_sf, n_jobs=60, n_workers=4)
    assert len(counts) == 60 and set(counts.values()) == {1}


def test_times_are_utc(sqlite_sf) -> None:  # noqa: F811
    _enqueue(sqlite_sf)
    job = queue.claim(sqlite_sf, "w")
    assert job.created_at.tzinfo is not None and job.created_at <= datetime.now(UTC)
