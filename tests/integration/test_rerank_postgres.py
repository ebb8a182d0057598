"""Several workers on one PostgreSQL database (issue 15, docs/scaling.md): real `dmad worker` processes
share the pool's re-ranking chunks, each chunk runs exactly once, and a worker SIGKILLed in the middle of a
chunk loses nothing (its lease expires and another worker runs the chunk again).

The home is trained on the tiny synthetic dataset with one image per chunk, so that there are many chunks
to share; its feature cache is copied from the loop tests' trained home (the same images), so the workers
spend their time on claims and scoring rather than on the backbone."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.home_folder import Home
from app.services.database import open_database
from app.services.loop.reranking import rerank_progress
from app.services.loop.training import train_version
from app.services.loop.versions import active_version
from db.models import Image, Job, PoolScore
from db.queue import JobType
from tests.db_fixtures import pg_server_url, pg_url  # noqa: F401
from tests.loop_fixtures import LoopHome, run_cli, trained_home_template  # noqa: F401
from tests.processes import dmad, wait_until

DONE = re.compile(r"job (\d+) done")


@pytest.fixture
def pg_home(pg_url: str, trained_home_template: LoopHome, tmp_path: Path) -> Home:  # noqa: F811
    """v0001 trained and promoted on PostgreSQL, its pool's re-ranking queued (one image a chunk), not run."""
    home = Home.at(tmp_path / "home")
    assert run_cli("init", "--home", home.root, "--db", pg_url, "--train-epochs", 2, "--retrain-epochs", 1) == 0
    shutil.copytree(trained_home_template.home.features_dir, home.features_dir, dirs_exist_ok=True)
    folders = sorted(p for p in trained_home_template.data.iterdir() if p.is_dir())
    assert run_cli("ingest", "--home", home.root, *folders) == 0
    home.save_settings(replace(home.load_settings(), evaluation_max_per_label=1, rerank_chunk_images=1))
    train_version(home, open_database(home), warm_start=False)
    return home


def _rerank_jobs(home: Home) -> list[Job]:
    with open_database(home)() as session:
        jobs = list(session.scalars(select(Job).where(Job.type == JobType.RERANK).order_by(Job.id)))
        session.expunge_all()
    return jobs


def _assert_pool_ranked_once(home: Home) -> None:
    with open_database(home)() as session:
        version = active_version(session)
        assert rerank_progress(session, version.id).complete
        pool = session.scalar(select(func.count(Image.id)).where(Image.role == "pool"))
        rows = session.scalar(select(func.count(PoolScore.id)).where(PoolScore.version_id == version.id))
        assert rows == pool


def test_four_worker_processes_share_the_chunks_each_exactly_once(pg_home: Home) -> None:
    chunks = _rerank_jobs(pg_home)
    assert len(chunks) >= 40 and {j.status for j in chunks} == {"queued"}
    workers = [subprocess.Popen(dmad("worker", "--home", str(pg_home.root), "--once", "--sync-every", "0"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0, 0], outputs
    ran = [Counter(int(m) for m in DONE.findall(out)) for out in outputs]
    total = sum(ran, Counter())
    assert set(total) == {j.id for j in chunks} and set(total.values()) == {1}  # every chunk, each once
    assert sum(1 for r in ran if r) >= 2, [len(r) for r in ran]  # the chunks were shared
    after = _rerank_jobs(pg_home)
    assert {j.status for j in after} == {"succeeded"} and {j.attempts for j in after} == {1}
    _assert_pool_ranked_once(pg_home)


def test_a_worker_killed_mid_chunk_loses_nothing(pg_home: Home) -> None:
    sessions = open_database(pg_home)
    victim = subprocess.Popen(dmad("worker", "--home", str(pg_home.root), "--lease-seconds", "3", "--sync-every", "0"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mark = f":{victim.pid}:"

    def running_chunk() -> Job | None:
        with sessions() as session:
            return session.scalars(select(Job).where(Job.type == JobType.RERANK, Job.status == "running",
                                                     Job.lease_owner.contains(mark))).first()

    try:
        # its first chunk loads the model (seconds), so it is caught in the middle of it
        assert wait_until(running_chunk, timeout=120, every=0.05), "the worker never claimed a chunk"
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    killed = running_chunk()
    assert killed is not None, "the chunk finished before the kill landed"

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # `--once` exits when nothing is claimable: the lease may not have expired yet
        assert subprocess.run(dmad("worker", "--home", str(pg_home.root), "--once", "--sync-every", "0",
                                   "--lease-seconds", "30"), capture_output=True, timeout=600).returncode == 0
        if {j.status for j in _rerank_jobs(pg_home)} == {"succeeded"}:
            break
        time.sleep(1)
    retried = next(j for j in _rerank_jobs(pg_home) if j.id == killed.id)
    assert (retried.status, retried.attempts, retried.lease_expiries) == ("succeeded", 2, 1)
    _assert_pool_ranked_once(pg_home)
