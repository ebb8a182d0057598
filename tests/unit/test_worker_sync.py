"""The worker's periodic Label Studio sync (`WorkerOptions.sync_every_seconds`), through `run_worker`.

The worker offers no way to hand it a Label Studio client (its sync job connects to the home's own
server), so the test that needs a sync to succeed runs against the real Label Studio of
tests/labelstudio_fixtures.py and skips where label-studio is not installed. The other test needs no
server: a home without a project must never get a sync job, and one with a project must get exactly
one waiting sync job however many sync periods pass while it waits.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from annotation.project import BRUSH_NAME, DEFAULT_LABELS, IMAGE_NAME, STATE_FILE, TaskItem, image_url_for, push_tasks
from annotation.rle import brush_result
from annotation.server import PASSWORD_SECRET, TOKEN_SECRET, LabelStudioServer
from app.home_folder import Home
from app.services.loop.annotations import load_mask
from app.services.database import open_database
from app.services.labelstudio.home import connect, has_project, webhook_base_url
from app.worker import WorkerOptions, run_worker
from db import queue
from db.engine import begin_write
from db.models import Annotation, Job
from tests.db_fixtures import add_test_image
from tests.processes import free_port, wait_until

SYNC = "labelstudio_sync"


_wait_for = functools.partial(wait_until, timeout=60.0, every=0.02)


def _jobs(sessions: sessionmaker[Session], type_: str) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).where(Job.type == type_).order_by(Job.id)))


@dataclass
class Watch:
    """Samples the queue while the worker runs: the most sync jobs ever seen waiting at once."""

    sessions: sessionmaker[Session]
    max_waiting: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _loop(self) -> None:
        while not self._stop.wait(0.005):
            waiting = sum(1 for job in _jobs(self.sessions, SYNC) if job.status == "queued")
            self.max_waiting = max(self.max_waiting, waiting)
            self.samples += 1


@contextmanager
def running_worker(home: Home, sessions: sessionmaker[Session], options: WorkerOptions) -> Iterator[Watch]:
    """`run_worker` on a thread until the block ends, watched by a sampler."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            run_worker(home, sessions, options, stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    watch = Watch(sessions)
    sampler = threading.Thread(target=watch._loop, daemon=True)
    thread = threading.Thread(target=work, daemon=True)
    sampler.start()
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join(timeout=60)
        watch._stop.set()
        sampler.join(timeout=10)
    assert not thread.is_alive(), "the worker did not stop"
    assert errors == []


def _count_claims(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Counts the worker loop's turns (each turn claims once)."""
    calls = [0]
    claim = queue.claim

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return claim(*args, **kwargs)

    monkeypatch.setattr(queue, "claim", counting)
    return lambda: calls[0]


def _enqueue_blockers(sessions: sessionmaker[Session], count: int) -> None:
    """Jobs that fail at once (no model to score with) and are claimed before any newer job: while the
    worker works through them, a sync period passes at every turn of its loop."""
    with sessions() as session:
        begin_write(session)
        for i in range(count):
            queue.enqueue(session, queue.JobType.SCORE_UPLOAD, queue.UploadToScore(path=f"/nonexistent/{i}.png",
                                                                                  category="x"), max_attempts=1)
        session.commit()


def test_sync_is_queued_only_for_a_home_with_a_project_and_coalesces(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    home = Home.at(tmp_path / "home")
    home.create()
    home.save_settings(replace(home.load_settings(), label_studio_port=free_port()))  # no Label Studio there
    sessions = open_database(home, create=True)
    turns = _count_claims(monkeypatch)
    options = WorkerOptions(sync_every_seconds=0.001, poll_seconds=0.01, worker_id="test-worker")

    # no project: however many sync periods pass, nothing is queued
    assert not has_project(home)
    _enqueue_blockers(sessions, 10)
    with running_worker(home, sessions, options) as watch:
        assert _wait_for(lambda: turns() >= 40)
        assert {job.status for job in _jobs(sessions, "score_upload")} == {"failed"}  # the loop ran them
    assert _jobs(sessions, SYNC) == []
    assert watch.samples > 0 and watch.max_waiting == 0

    # a project recorded: a sync job is queued at once, and stays the only one waiting while the
    # worker is busy with older jobs for many sync periods
    (home.labelstudio_dir / STATE_FILE).write_text(json.dumps({"project_id": 1, "title": "DMAD inspection"}))
    assert has_project(home)
    _enqueue_blockers(sessions, 10)
    enqueued_ids: list[int] = []
    enqueue = queue.enqueue

    def recording(session: Session, type_: str, *args: Any, **kwargs: Any) -> Job:
        job = enqueue(session, type_, *args, **kwargs)
        if type_ == SYNC:
            enqueued_ids.append(job.id)
        return job

    monkeypatch.setattr(queue, "enqueue", recording)
    with running_worker(home, sessions, options) as watch:
        # the sync job runs (and fails: nothing listens on the home's Label Studio port) and is retried
        assert _wait_for(lambda: any(job.attempts >= 2 for job in _jobs(sessions, SYNC)))
    syncs = _jobs(sessions, SYNC)
    first = syncs[0]
    assert enqueued_ids[:10] == [first.id] * 10  # while the blockers ran, each period found the same waiting job
    assert watch.samples > 0 and watch.max_waiting <= 1
    assert "Label Studio is not running" in (first.error or "")
    assert (first.payload, first.coalesce_key) == ({"trigger": "periodic"}, SYNC)


@pytest.mark.integration
@pytest.mark.slow
def test_worker_pulls_label_studio_annotations_every_period(labelstudio: LabelStudioServer,  # noqa: F811
                                                            tmp_path: Path) -> None:
    """A real sync on a real server: annotations made in Label Studio (no webhook receiver is running)
    reach the database through the worker alone, the first at the worker's start, the second at a later
    period."""
    home = Home.at(tmp_path / "home")
    home.create()
    for name in (TOKEN_SECRET, PASSWORD_SECRET):  # the session's server, with this home's own project
        home.write_secret(name, Home.at(labelstudio.paths.owner).read_secret(name) or "")
    home.save_settings(replace(home.load_settings(), label_studio_port=labelstudio.port, webhook_port=free_port(),
                               label_studio_project=f"DMAD worker sync {uuid.uuid4().hex[:8]}"))
    sessions = open_database(home, create=True)
    with sessions() as session:
        images = [add_test_image(session, tmp_path, f"img{i}", width=37, height=23) for i in range(2)]
        session.commit()
    connection = connect(home)
    client, project_id = connection.client, connection.project_id
    assert has_project(home)
    items = [TaskItem(image_id=im.id, content_hash=im.content_hash, category="bottle",
                      image_url=image_url_for(webhook_base_url(home), im.content_hash), width=im.width,
                      height=im.height, score=0.9, model_version="v0001") for im in images]
    assert push_tasks(client, project_id, items).created == 2
    tasks = {t.data["image_id"]: t.id for t in client.tasks.list(project=project_id, fields="all")}

    def annotate(image_id: int, result: list[dict[str, Any]]) -> str:
        response = requests.post(f"{labelstudio.url}/api/tasks/{tasks[image_id]}/annotations/", json={"result": result},
                                 headers={"Authorization": f"Token {labelstudio.token()}"}, timeout=30)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def stored(external_id: str) -> Annotation | None:
        with sessions() as session:
            return session.scalars(select(Annotation).where(Annotation.external_id == external_id)).first()

    def succeeded_syncs() -> list[Job]:
        return [job for job in _jobs(sessions, SYNC) if job.status == "succeeded"]

    first = annotate(images[0].id, [{"type": "choices", "from_name": "verdict", "to_name": IMAGE_NAME,
                                     "value": {"choices": ["normal"]}}])
    assert stored(first) is None and _jobs(sessions, SYNC) == []
    drawn = np.zeros((23, 37), dtype=bool)
    drawn[4:15, 9:30] = True
    options = WorkerOptions(sync_every_seconds=1.0, poll_seconds=0.05, worker_id="test-worker")
    with running_worker(home, sessions, options) as watch:
        assert _wait_for(lambda: stored(first) is not None and len(succeeded_syncs()) >= 1)
        done = len(succeeded_syncs())
        second = annotate(images[1].id, [brush_result(drawn, BRUSH_NAME, IMAGE_NAME, DEFAULT_LABELS[0])])
        assert _wait_for(lambda: stored(second) is not None and len(succeeded_syncs()) > done)

    syncs = succeeded_syncs()
    assert syncs[0].message.startswith("1 created, 0 updated, 0 deleted, 0 failed")
    assert any(job.message.startswith("1 created") for job in syncs[1:])
    assert all(job.payload == {"trigger": "periodic"} for job in _jobs(sessions, SYNC))
    normal, defect = stored(first), stored(second)
    assert (normal.kind, normal.source, normal.image_id) == ("normal", "labelstudio", images[0].id)
    assert (defect.kind, defect.image_id) == ("defect_mask", images[1].id)
    assert np.array_equal(load_mask(defect, home), drawn)
    assert watch.samples > 0 and watch.max_waiting <= 1


def test_a_starting_worker_removes_version_folders_abandoned_by_a_killed_training(tmp_path: Path) -> None:
    """A temporary version folder older than an hour (its training died) goes; a fresh one (a training
    running in another worker right now) stays."""
    import os

    home = Home.at(tmp_path / "home")
    home.create()
    sessions = open_database(home, create=True)
    old, fresh = home.models_dir / ".tmp-v0002-dead", home.models_dir / ".tmp-v0003-live"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "model.json").write_text("{}")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    run_worker(home, sessions, WorkerOptions(once=True, sync_every_seconds=None))
    assert not old.exists() and fresh.is_dir()
