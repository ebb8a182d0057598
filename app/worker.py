"""`dmad worker`: claims jobs from the queue and runs them, one at a time.

Each job runs under a lease that a heartbeat extends while it works (progress and a message go with
it, for the UI's progress bars). A worker that dies stops heartbeating; when its lease expires another
worker claims the job again, up to the job's attempt limit, after which the job fails with the error
kept. A worker that finds it has lost its lease stops at the next checkpoint and publishes nothing.

Job types (`db.queue.JobType`, each with its typed payload): 'train' (from scratch), 'retrain' (warm start
from the active version; annotations coalesce into one), 'rerank' (one chunk of the pool scored under the
active version, queued by each promotion below every other job's priority; see app/services/loop/reranking.py),
'score_upload' (one uploaded image; its score is the job's result) and 'labelstudio_sync' (pull annotations
the webhook missed; also run every `sync_every_seconds`).

Workers on several machines share one database and a home on a shared file system (docs/scaling.md): a
claim never hands one job to two workers, and a worker's loaded model is kept between the chunks it runs.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.home_folder import Home
from app.services.line.inference import LoadedModel
from app.services.read.metrics import WorkerMetrics
from db import queue
from db.engine import DATABASE_AWAY, write_transaction
from db.models import Job, utcnow
from db.queue import JobPayload, JobType, RerankChunk, Trigger, UploadToScore
from dmad_core.errors import Conflict

log = logging.getLogger(__name__)

JOB_TYPES: tuple[JobType, ...] = tuple(JobType)


class JobLost(Exception):
    """This worker no longer owns the job (lease expired and taken over, or cancelled)."""


@dataclass(frozen=True)
class WorkerOptions:
    once: bool = False  # run what is claimable now, then exit
    lease_seconds: float = 60.0
    poll_seconds: float = 1.0
    heartbeat_seconds: float = 2.0  # at most this long between heartbeats while a job runs
    sync_every_seconds: float | None = 60.0  # Label Studio sync (when its project exists); None: never
    worker_id: str = ""
    job_types: tuple[str, ...] = JOB_TYPES  # what this worker claims
    metrics_port: int | None = None  # serve Prometheus metrics on 127.0.0.1:PORT/metrics
    metrics_file: str | None = None  # or write them to this file (node-exporter textfile collector)
    retry_seconds: float = 5.0  # how long to wait before trying the database again when it does not answer


class JobRun:
    """The running job's link to the queue: progress reports and the check that it is still ours."""

    def __init__(self, sessions: sessionmaker[Session], job: Job, worker_id: str, options: WorkerOptions,
                 on_progress: Callable[[float, str], None] | None = None, loaded: LoadedModel | None = None):
        self.sessions, self.job_id, self.worker_id, self.options = sessions, job.id, worker_id, options
        self.on_progress = on_progress
        self.loaded = loaded or LoadedModel()  # the worker's model, kept from one chunk to the next
        self.payload: JobPayload = queue.payload_of(job)
        self.result: dict[str, Any] | None = None  # what the handler leaves; stored with the job's success
        self._state = (0.0, "started")
        self._lost = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job.id}", daemon=True)

    def __enter__(self) -> JobRun:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _send(self) -> None:
        with self._lock:
            fraction, message = self._state
            if not queue.heartbeat(self.sessions, self.job_id, self.worker_id, fraction, message,
                                   self.options.lease_seconds):
                self._lost.set()

    def _beat(self) -> None:
        while not self._done.wait(self.options.heartbeat_seconds):
            try:
                self._send()
            except Exception:  # noqa: BLE001 - a database hiccup must not kill the job; the lease covers it
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)

    def progress(self, fraction: float, message: str) -> None:
        self._state = (float(fraction), message)
        if self.on_progress is not None:
            self.on_progress(fraction, message)
        if self._lost.is_set():
            raise JobLost(f"job {self.job_id} is no longer owned by {self.worker_id}")

    def checkpoint(self, message: str) -> None:
        """Heartbeat now and stop if the job is no longer ours: called before anything is published."""
        self._state = (self._state[0], message)
        self._send()
        if self._lost.is_set():
            raise JobLost(f"job {self.job_id} is no longer owned by {self.worker_id}; not publishing")


# -- handlers ---------------------------------------------------------------------------------------
def _train(home: Home, sessions: sessionmaker[Session], run: JobRun, warm_start: bool) -> str:
    from app.services.loop.training import train_version

    outcome = train_version(home, sessions, warm_start=warm_start, job_id=run.job_id, progress=run.progress,
                            checkpoint=run.checkpoint)
    return f"{outcome.version} active ({outcome.mode.replace('_', ' ')}, {outcome.seconds['total']:.0f} s)"


def _rerank(home: Home, sessions: sessionmaker[Session], run: JobRun) -> str:
    from app.services.loop.reranking import rerank_chunk

    assert isinstance(run.payload, RerankChunk)  # payload_of read it as the rerank job's record
    return rerank_chunk(home, sessions, run.job_id, run.payload, run.loaded, progress=run.progress,
                        checkpoint=run.checkpoint)


def _score_upload(home: Home, sessions: sessionmaker[Session], run: JobRun) -> str:
    from app.services.loop import versions
    from app.services.home_model import score_upload

    run.progress(0.1, "scoring the uploaded image")
    with sessions() as session:
        version = versions.active_version(session)
        if version is None:
            raise RuntimeError("no active model version yet; train one with `dmad train`")
        upload = run.payload
        assert isinstance(upload, UploadToScore)  # payload_of read it as the score_upload job's record
        result = score_upload(home, session, version, upload.path, upload.category, run.loaded)
    run.result = result  # stored by queue.complete, with the job's success
    return f"{result['decision']} (score {result['score']:.3f}, threshold {result['threshold']:.3f}) under {version.name}"


def _labelstudio_sync(home: Home, sessions: sessionmaker[Session], run: JobRun) -> str:
    from app.services.labelstudio.home import sync_project
    from app.services.labelstudio.tasks import refresh_tasks

    report, _project_id = sync_project(home, sessions)
    refreshed = refresh_tasks(home, sessions)  # tasks a re-ranking could not reach (Label Studio was down)
    return (f"{report.created} created, {report.updated} updated, {report.deleted} deleted, "
            f"{len(report.failed)} failed" + (f"; {refreshed} tasks given the active version's proposal"
                                              if refreshed else ""))


# The job types that can write features into the cache: the budget is held after these only (a Label Studio
# sync, once a minute, would otherwise list every cache entry each time for nothing).
FILLS_FEATURE_CACHE = frozenset({JobType.TRAIN, JobType.RETRAIN, JobType.RERANK, JobType.SCORE_UPLOAD})

HANDLERS: dict[str, Callable[[Home, sessionmaker[Session], JobRun], str]] = {
    JobType.TRAIN: functools.partial(_train, warm_start=False),
    JobType.RETRAIN: functools.partial(_train, warm_start=True),
    JobType.RERANK: _rerank,
    JobType.SCORE_UPLOAD: _score_upload,
    JobType.LABELSTUDIO_SYNC: _labelstudio_sync,
}


# -- the loop ---------------------------------------------------------------------------------------
def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def run_job(home: Home, sessions: sessionmaker[Session], job: Job, options: WorkerOptions, worker_id: str,
            on_progress: Callable[[float, str], None] | None = None, loaded: LoadedModel | None = None,
            metrics: WorkerMetrics | None = None) -> bool:
    """Run one claimed job to its end; True when it succeeded."""
    handler = HANDLERS.get(job.type)
    if handler is None:
        queue.fail(sessions, job.id, worker_id, f"unknown job type {job.type!r}; this worker runs {', '.join(JOB_TYPES)}")
        return False
    log.info("job %s (%s), attempt %s/%s", job.id, job.type, job.attempts, job.max_attempts)
    started = time.perf_counter()
    try:
        with JobRun(sessions, job, worker_id, options, on_progress, loaded) as run:
            message = handler(home, sessions, run)
    except JobLost as exc:
        log.warning("%s", exc)
        _observe(metrics, job, "lost", started)
        return False
    except Exception as exc:  # noqa: BLE001 - the error is kept on the job; the worker goes on
        log.error("job %s failed: %s", job.id, exc)
        _observe(metrics, job, "failed", started, type(exc).__name__)
        queue.fail(sessions, job.id, worker_id, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
        return False
    queue.complete(sessions, job.id, worker_id, message, result=run.result)
    log.info("job %s done: %s", job.id, message)
    _observe(metrics, job, "succeeded", started)
    if job.type in FILLS_FEATURE_CACHE:
        _hold_cache_budget(home, sessions)
    return True


def _observe(metrics: WorkerMetrics | None, job: Job, outcome: str, started: float, error: str | None = None) -> None:
    """The job's duration and outcome; for a (re)train that succeeded, the seconds since it was queued
    (its version is active when the job ends)."""
    if metrics is None:
        return
    metrics.observe_job(job.type, outcome, time.perf_counter() - started, error)
    if outcome == "succeeded" and job.type in ("train", "retrain") and job.created_at is not None:
        metrics.retrain_to_active.observe(max(0.0, (utcnow() - job.created_at).total_seconds()))


def _hold_cache_budget(home: Home, sessions: sessionmaker[Session]) -> None:
    """After a job that can fill the feature cache, evict down to the home's budget; a failure here is
    logged, never the job's."""
    from app.services.cache_budget import enforce

    try:
        report = enforce(home, sessions)
    except Exception:  # noqa: BLE001
        log.exception("could not hold the feature cache to its budget")
        return
    if report is not None and report.evicted:
        log.info("feature cache: %d entries evicted, %.1f MB now (budget %.1f MB)", report.evicted,
                 report.bytes_after / 1e6, home.load_settings().feature_cache_max_bytes / 1e6)


def train_in_foreground(home: Home, sessions: sessionmaker[Session],
                        on_claimed: Callable[[int], None] | None = None,
                        on_progress: Callable[[float, str], None] | None = None) -> tuple[bool, Job]:
    """Queues a 'train' job and runs it in this process, so the UI sees its progress like any other
    job's; (succeeded, the finished job row). `on_claimed` gets the job id once this process owns it."""
    with sessions() as session, write_transaction(session):
        job_id = queue.enqueue(session, JobType.TRAIN, Trigger(trigger="cli"), coalesce_key=JobType.TRAIN).id
    worker_id = default_worker_id()
    claimed = queue.claim(sessions, worker_id, [JobType.TRAIN])
    if claimed is None or claimed.id != job_id:
        raise Conflict("another worker took the training job; follow it with `dmad status`")
    if on_claimed is not None:
        on_claimed(job_id)
    ok = run_job(home, sessions, claimed, WorkerOptions(), worker_id, on_progress=on_progress)
    with sessions() as session:
        return ok, session.get(Job, job_id)


def _sync_due(home: Home, sessions: sessionmaker[Session], options: WorkerOptions, last: float) -> bool:
    """Queue a Label Studio sync when one is due and the home has a Label Studio project."""
    from app.services.labelstudio.home import has_project

    if options.sync_every_seconds is None or time.monotonic() - last < options.sync_every_seconds:
        return False
    if not has_project(home):
        return False
    with sessions() as session, write_transaction(session):
        queue.enqueue(session, JobType.LABELSTUDIO_SYNC, Trigger(trigger="periodic"),
                      coalesce_key=JobType.LABELSTUDIO_SYNC)
    return True


def run_worker(home: Home, sessions: sessionmaker[Session], options: WorkerOptions = WorkerOptions(),
               stop: threading.Event | None = None) -> int:
    """Claim and run jobs until `stop` is set (or, with `once`, until nothing is claimable).
    Returns the number of jobs that succeeded.

    A database that stops answering does not stop the worker: it logs it, waits ``retry_seconds`` and
    tries again (the pool reconnects); a job it was running when the database went away keeps its lease
    and is claimed again once the lease expires."""
    stop = stop or threading.Event()
    worker_id = options.worker_id or default_worker_id()
    succeeded, last_sync = 0, time.monotonic() - (options.sync_every_seconds or 0)
    loaded = LoadedModel()
    log.info("worker %s started on %s", worker_id, home.root)
    _remove_abandoned_version_folders(home, sessions)
    if not options.once:
        _load_engine()
        log.info("worker %s ready", worker_id)
    metrics, close_metrics = _start_metrics(sessions, options)
    try:
        while not stop.is_set():
            try:
                if not options.once and _sync_due(home, sessions, options, last_sync):
                    last_sync = time.monotonic()
                job = queue.claim(sessions, worker_id, options.job_types, options.lease_seconds)
                if job is None:
                    if options.once:
                        break
                    stop.wait(options.poll_seconds)
                    continue
                succeeded += run_job(home, sessions, job, options, worker_id, loaded=loaded, metrics=metrics)
            except DATABASE_AWAY as exc:
                if options.once:
                    raise
                log.warning("the database does not answer (%s); trying again in %.0f s",
                            str(exc.orig).splitlines()[0] if exc.orig else exc, options.retry_seconds)
                stop.wait(options.retry_seconds)
            if metrics is not None and options.metrics_file:
                metrics.write_textfile(Path(options.metrics_file))
    finally:
        close_metrics()
    return succeeded


def _start_metrics(sessions: sessionmaker[Session], options: WorkerOptions) -> tuple[WorkerMetrics | None, Callable[[], None]]:
    """The worker's metrics when a port or a file is asked for: (metrics, the function that stops them)."""
    if options.metrics_port is None and not options.metrics_file:
        return None, lambda: None
    from app.services.loop.reranking import rerank_progress
    from app.services.loop.versions import active_version

    def rerank() -> tuple[int, int, int]:
        with sessions() as session:
            version = active_version(session)
            if version is None:
                return 0, 0, 0
            p = rerank_progress(session, version.id)
            return p.scored, p.pool, p.chunks_open

    def queued() -> dict[str, int]:
        with sessions() as session:
            rows = session.execute(select(Job.type, func.count(Job.id)).where(Job.status.in_(("queued", "running")))
                                   .group_by(Job.type)).all()
        return {**{t: 0 for t in JOB_TYPES}, **{t: int(n) for t, n in rows}}

    metrics = WorkerMetrics()
    metrics.watch(rerank, queued)
    close: Callable[[], None] = lambda: None  # noqa: E731
    if options.metrics_port is not None:
        close = metrics.serve_http(options.metrics_port)
    return metrics, close


def rerank_now(home: Home, sessions: sessionmaker[Session]) -> int:
    """Run the queued re-ranking chunks in this process until none is left (what `dmad train` does after
    training, so that a home without a worker still has a ranked pool; running workers share the chunks).
    Returns the chunks this process ran."""
    return run_worker(home, sessions, WorkerOptions(once=True, sync_every_seconds=None, job_types=(JobType.RERANK,)))


def _remove_abandoned_version_folders(home: Home, sessions: sessionmaker[Session]) -> None:
    """A worker killed while writing a version leaves its temporary folder (never listed, never active);
    those older than an hour are removed when a worker starts, so they do not pile up."""
    from app.services.loop.versions import cleanup_orphans

    with sessions() as session:
        report = cleanup_orphans(session, home)
    for folder in report.removed_tmp:
        log.info("removed %s, left by a training that did not finish", folder)


def _load_engine() -> None:
    """Imports the engine (PyTorch, faiss, timm: seconds) before the first job rather than inside it, so
    an idle worker answers the next annotation at once."""
    import app.services.loop.training  # noqa: F401
    import dmad_core.banks  # noqa: F401
