"""A worker killed with SIGKILL in the middle of a retrain: the active version stays loadable all the
while, nothing half-written becomes a version, and another worker retries the job to success."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from sqlalchemy import select

from app.services.database import open_database
from app.services.home_model import load_model
from app.services.loop.versions import active_version, list_versions
from db.models import Image, Job
from tests.loop_fixtures import LoopHome, cli_process, run_cli, trained_home, trained_home_template  # noqa: F401


def _job(sessions, job_id: int) -> Job:
    with sessions() as session:
        return session.get(Job, job_id, populate_existing=True)


def test_a_worker_killed_mid_retrain_is_retried_by_another(trained_home: LoopHome) -> None:
    sessions = open_database(trained_home.home)
    with sessions() as session:
        image = session.scalars(select(Image).where(Image.role == "pool", Image.gt_label == 1)).first()
        path, mask = image.path, image.gt_mask_path
    assert run_cli("annotate", *trained_home.args, path, "--mask", mask) == 0
    with sessions() as session:
        job_id = session.scalars(select(Job.id).where(Job.type == "retrain")).one()

    victim = cli_process("worker", *trained_home.args, "--lease-seconds", 3, "--poll-seconds", 0.2,
                         "--sync-every", 0, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # kill it once it is visibly training
            job = _job(sessions, job_id)
            if job.status == "running" and job.progress > 0.0:
                break
            assert victim.poll() is None, "the worker exited before it was killed"
            time.sleep(0.05)
        else:
            raise AssertionError("the retrain never started")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
    finally:
        if victim.poll() is None:
            victim.kill()
    job = _job(sessions, job_id)
    assert job.status == "running" and job.attempts == 1  # killed mid-job, its lease still held

    with sessions() as session:  # the active version is still the first one, and it loads
        active = active_version(session)
        assert active.name == "v0001"
        assert load_model(trained_home.home, active).is_fitted
        assert [v.name for v in list_versions(session)] == ["v0001"]

    time.sleep(3.5)  # the dead worker's lease expires
    assert run_cli("worker", *trained_home.args, "--once", "--sync-every", 0) == 0
    job = _job(sessions, job_id)
    assert (job.status, job.attempts, job.lease_expiries) == ("succeeded", 2, 1)
    with sessions() as session:
        versions = list_versions(session)
        active = active_version(session)
        assert active.name == versions[-1].name
        assert all(not os.path.basename(v.folder).startswith(".tmp-") for v in versions)
        assert all(os.path.isdir(v.folder) for v in versions)
        assert load_model(trained_home.home, active).is_fitted
