"""The database layer on a real PostgreSQL server: the same checks as on SQLite, plus real concurrency
(threads on separate connections, real `FOR UPDATE SKIP LOCKED`, real unique-index races).

Skips when the server at $DMAD_TEST_POSTGRES_URL (default postgres@127.0.0.1:5432/test) is unreachable.
Each test runs in its own fresh database, dropped afterwards.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime

import numpy as np
import pytest
from sqlalchemy import func, select

from app.services.loop.annotations import record_annotation
from db import queue
from db.engine import make_engine, session_factory
from db.models import Annotation, Base, Job
from tests.db_fixtures import (  # noqa: F401
    add_test_image,
    home,
    pg_engine,
    pg_server_url,
    pg_sf,
    pg_url,
)
from tests.unit import test_db_annotations, test_db_models, test_db_queue, test_db_repositories, test_db_versions
from tests.unit.test_db_migrations import check_job_result_moves_to_its_column_and_back, check_up_down_up, schema_diff

pytestmark = pytest.mark.integration


def _ids(checks):
    return [c.__name__.removeprefix("check_") for c in checks]


def test_migrations_up_down_up(pg_url: str) -> None:  # noqa: F811
    check_up_down_up(pg_url)


def test_job_result_moves_to_its_column_and_back(pg_url: str) -> None:  # noqa: F811
    check_job_result_moves_to_its_column_and_back(pg_url)


def test_head_migration_matches_models(pg_engine, pg_url: str) -> None:  # noqa: F811
    assert schema_diff(pg_url, Base.metadata) == []


def test_engine_pings_and_stores_utc(pg_engine) -> None:  # noqa: F811
    assert pg_engine.pool._pre_ping is True
    with pg_engine.connect() as conn:
        column = conn.exec_driver_sql(
            "SELECT data_type FROM information_schema.columns WHERE table_name='jobs' AND column_name='created_at'"
        ).scalar()
    assert column == "timestamp with time zone"


@pytest.mark.parametrize("check", test_db_models.CHECKS, ids=_ids(test_db_models.CHECKS))
def test_models(check, pg_sf) -> None:  # noqa: F811
    check(pg_sf)


@pytest.mark.parametrize("check", test_db_queue.CHECKS, ids=_ids(test_db_queue.CHECKS))
def test_queue(check, pg_sf) -> None:  # noqa: F811
    check(pg_sf)


@pytest.mark.parametrize("check", test_db_versions.CHECKS, ids=_ids(test_db_versions.CHECKS))
def test_versions(check, pg_sf, home) -> None:  # noqa: F811
    check(pg_sf, home)


@pytest.mark.parametrize("check", test_db_annotations.CHECKS, ids=_ids(test_db_annotations.CHECKS))
def test_annotations(check, pg_sf, home, tmp_path) -> None:  # noqa: F811
    check(pg_sf, home, tmp_path)


@pytest.mark.parametrize("check", test_db_repositories.CHECKS, ids=_ids(test_db_repositories.CHECKS))
def test_repositories(check, pg_sf, tmp_path) -> None:  # noqa: F811
    check(pg_sf, tmp_path)


def test_four_threads_claim_200_jobs_each_exactly_once(pg_sf) -> None:  # noqa: F811
    counts = test_db_queue.claim_concurrently(pg_sf, n_jobs=200, n_workers=4)
    assert len(counts) == 200 and set(counts.values()) == {1}
    with pg_sf() as session:
        statuses = Counter(session.scalars(select(Job.status)))
    assert statuses == {"succeeded": 200}


def _claim_until_empty(url: str, worker: str, start_at: float) -> list[int]:
    """A worker process: its own engine and connections, claiming and completing until none is left."""
    engine = make_engine(url)
    sf = session_factory(engine)
    claimed = []
    try:
        time.sleep(max(0.0, start_at - time.time()))  # all processes start claiming together
        while (job := queue.claim(sf, worker)) is not None:
            claimed.append(job.id)
            assert queue.complete(sf, job.id, worker)
    finally:
        engine.dispose()
    return claimed


def test_four_processes_claim_200_jobs_each_exactly_once(pg_sf, pg_url) -> None:  # noqa: F811
    with pg_sf() as session:
        for i in range(200):
            queue.enqueue(session, queue.JobType.SCORE_UPLOAD, test_db_queue.payload("score_upload", i))
        session.commit()
    start_at = time.time() + 3.0  # time for the spawned interpreters to import everything
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_claim_until_empty, [pg_url] * 4, [f"p{i}" for i in range(4)], [start_at] * 4))
    counts = Counter(job_id for claimed in results for job_id in claimed)
    assert len(counts) == 200 and set(counts.values()) == {1}
    assert sum(1 for claimed in results if claimed) >= 2, "the workers did not actually overlap"


def test_claim_skips_a_row_another_transaction_holds(pg_sf) -> None:  # noqa: F811
    """Proof that SKIP LOCKED is in play: with the oldest job locked elsewhere, a claim returns the next
    one at once instead of waiting for the lock."""
    with pg_sf() as session:
        first, second = (queue.enqueue(session, queue.JobType.TRAIN, test_db_queue.payload("train")).id for _ in range(2))
        session.commit()
    holder = pg_sf()
    try:
        locked = holder.scalars(select(Job).where(Job.id == first).with_for_update()).one()
        assert locked.id == first
        with ThreadPoolExecutor(1) as pool:  # another connection, another thread
            claimed = pool.submit(queue.claim, pg_sf, "w2").result(timeout=10)
        assert claimed is not None and claimed.id == second
    finally:
        holder.rollback()
        holder.close()
    again = queue.claim(pg_sf, "w3")
    assert again is not None and again.id == first


def test_concurrent_enqueues_coalesce_into_one_job(pg_sf) -> None:  # noqa: F811
    start = threading.Barrier(8)

    def enqueue_one(_: int) -> int:
        with pg_sf() as session:
            start.wait()
            job = queue.enqueue(session, queue.JobType.RETRAIN, test_db_queue.payload("retrain"), coalesce_key="retrain")
            session.commit()
            return job.id

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(enqueue_one, range(8)))
    assert len(ids) == 1
    with pg_sf() as session:
        assert session.scalar(select(func.count(Job.id))) == 1


def test_concurrent_deliveries_of_one_annotation_store_one_row(pg_sf, home, tmp_path) -> None:  # noqa: F811
    with pg_sf() as session:
        image_id = add_test_image(session, tmp_path, "race", width=32, height=24).id
        session.commit()
    mask = np.zeros((24, 32), bool)
    mask[3:9, 3:9] = True
    when = datetime(2025, 1, 1, tzinfo=UTC)
    start = threading.Barrier(6)

    def deliver(_: int) -> str:
        with pg_sf() as session:
            start.wait()
            return record_annotation(session, home, image=image_id, kind="defect_mask", mask=mask,
                                     source="labelstudio", external_id="42", source_updated_at=when).outcome

    with ThreadPoolExecutor(6) as pool:
        outcomes = Counter(pool.map(deliver, range(6)))
    assert outcomes == {"created": 1, "unchanged": 5}
    with pg_sf() as session:
        (annotation_id,) = session.scalars(select(Annotation.id)).all()
        assert session.scalar(select(func.count(Job.id))) == 1
    assert sorted(p.name for p in home.masks_dir.iterdir()) == [f"{annotation_id}.png"]


def test_a_waiting_retrain_joined_by_an_open_transaction_is_not_claimed_before_it_commits(pg_sf) -> None:  # noqa: F811
    """An annotation joins the waiting retrain in its own transaction; a worker must not start that retrain
    (and read the training data) before the annotation is committed, or the annotation would be in no
    retrain at all. While the joining transaction is open the claim finds nothing; after it commits the
    claim takes the job. A job claimed first makes the next enqueue queue a new one."""
    with pg_sf() as session:
        waiting = queue.enqueue(session, queue.JobType.RETRAIN, test_db_queue.payload("retrain"), coalesce_key="retrain").id
        session.commit()
    joiner = pg_sf()
    try:
        assert queue.enqueue(joiner, queue.JobType.RETRAIN, test_db_queue.payload("retrain"), coalesce_key="retrain").id == waiting  # joined, not committed
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(queue.claim, pg_sf, "w1").result(timeout=10) is None
        joiner.commit()
    finally:
        joiner.close()
    claimed = queue.claim(pg_sf, "w1")
    assert claimed is not None and claimed.id == waiting
    with pg_sf() as session:
        assert queue.enqueue(session, queue.JobType.RETRAIN, test_db_queue.payload("retrain"), coalesce_key="retrain").id != waiting
        session.commit()
