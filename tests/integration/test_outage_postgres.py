"""What each part does while the database is away (issue 23), on a PostgreSQL server of the test's own
(benchmarks/own_postgres.py: the machine's binaries, a spare port, a temporary folder), stopped and
started again under real processes:

* `dmad serve` goes on scoring from the loaded model; every image it answers 200 is spooled on the home's
  disk and reaches the pool, exactly once, when the database is back;
* a `dmad serve` SIGKILLed with a spooled feed feeds it when it is started again;
* a running `dmad worker` and `dmad webhook` reconnect by themselves: the webhook answers 503 with
  Retry-After while the database is away (Label Studio's next sync brings those annotations), then
  records again; the worker runs the next job without a restart.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest
from sqlalchemy import func, select

from annotation.rle import brush_result
from app.home_folder import Home
from app.services.database import open_database
from app.services.labelstudio.home import webhook_secret
from app.services.loop.training import train_version
from benchmarks.own_postgres import OwnPostgres, binaries
from db import queue
from db.engine import write_transaction
from db.models import Annotation, Image, Job, PoolScore
from tests.loop_fixtures import LoopHome, run_cli, trained_home_template  # noqa: F401
from tests.processes import answers, dmad, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "outage-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"}


@pytest.fixture(scope="module")
def own_pg() -> Iterator[OwnPostgres]:
    if binaries() is None:
        pytest.skip("no PostgreSQL binaries under /usr/lib/postgresql/*/bin to start a server of the test's own")
    try:
        pg = OwnPostgres.create()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"could not start a PostgreSQL server of the test's own: {exc}")
    with pg:
        yield pg


@pytest.fixture(scope="module")
def pg_home(own_pg: OwnPostgres, trained_home_template: LoopHome, tmp_path_factory: pytest.TempPathFactory) -> Home:  # noqa: F811
    """v0001 trained on the own server, its pool ranked; the serve token set."""
    import shutil

    home = Home.at(tmp_path_factory.mktemp("outage") / "home")
    assert run_cli("init", "--home", home.root, "--db", own_pg.url("dmad"), "--train-epochs", 2, "--retrain-epochs", 1) == 0
    shutil.copytree(trained_home_template.home.features_dir, home.features_dir, dirs_exist_ok=True)
    folders = sorted(p for p in trained_home_template.data.iterdir() if p.is_dir())
    assert run_cli("ingest", "--home", home.root, *folders) == 0
    home.save_settings(replace(home.load_settings(), evaluation_max_per_label=2))
    train_version(home, open_database(home), warm_start=False)
    home.write_secret("serve_token", TOKEN)
    return home


@pytest.fixture(autouse=True)
def database_up(own_pg: OwnPostgres) -> Iterator[None]:
    """Every test starts and ends with the server up, whatever it did in between."""
    if not own_pg.running:
        own_pg.start()
    yield
    if not own_pg.running:
        own_pg.start()


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


class Proc:
    """A `dmad` command as a real process, logging to a file."""

    def __init__(self, log: Path, *args: str):
        self.log = open(log, "a")
        self.path = log
        self.p = subprocess.Popen(dmad(*args), env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=self.log,
                                  stderr=subprocess.STDOUT, cwd=log.parent)

    def kill(self) -> None:
        os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait(timeout=30)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def tail(self) -> str:
        return self.path.read_text()[-3000:]


def start_serve(home: Home, port: int, log: Path) -> Proc:
    proc = Proc(log, "serve", "--home", str(home.root), "--port", str(port))
    assert wait_until(lambda: answers(f"http://127.0.0.1:{port}/v1/health"), timeout=180, every=0.5), proc.tail()
    return proc


def score(port: int, seed: int) -> str:
    r = httpx.post(f"http://127.0.0.1:{port}/v1/score?category=tiles", content=png(seed), headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["sha256"]


def pooled(home: Home, hashes: list[str]) -> dict[str, tuple[int, int]]:
    """{sha256: (image rows, pool score rows)} of line images."""
    with open_database(home)() as session:
        rows = session.execute(
            select(Image.content_hash, func.count(func.distinct(Image.id)), func.count(PoolScore.id))
            .outerjoin(PoolScore, PoolScore.image_id == Image.id)
            .where(Image.content_hash.in_(hashes)).group_by(Image.content_hash)).all()
    return {h: (int(i), int(s)) for h, i, s in rows}


def spool_files(home: Home) -> list[Path]:
    return sorted(home.spool_dir.glob("*.npz")) if home.spool_dir.exists() else []


def test_serve_scores_while_the_database_is_away_and_loses_no_image(own_pg: OwnPostgres, pg_home: Home,
                                                                     tmp_path: Path) -> None:
    port = free_port()
    serve = start_serve(pg_home, port, tmp_path / "serve.log")
    try:
        hashes = [score(port, seed) for seed in range(100, 103)]
        own_pg.stop()
        away = [score(port, seed) for seed in range(103, 109)]  # all 200: scored by the loaded model
        assert spool_files(pg_home), "the images answered while the database was away are on the disk"
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        spooled = next(float(m.split()[1]) for m in metrics.splitlines() if m.startswith("dmad_serve_spooled_images "))
        assert 6 <= spooled <= 9  # the 6 answered while it was away (and any before it not fed yet)
        own_pg.start()
        assert wait_until(lambda: not spool_files(pg_home), timeout=120, every=0.5), serve.tail()
        got = pooled(pg_home, hashes + away)
        assert got == {h: (1, 1) for h in hashes + away}  # each exactly once, with its score
        assert serve.p.poll() is None
    finally:
        serve.stop()


def test_a_serve_killed_with_a_spooled_feed_feeds_it_when_started_again(own_pg: OwnPostgres, pg_home: Home,
                                                                          tmp_path: Path) -> None:
    port = free_port()
    serve = start_serve(pg_home, port, tmp_path / "serve.log")
    own_pg.stop()
    try:
        hashes = [score(port, seed) for seed in range(200, 205)]
        assert len(spool_files(pg_home)) >= 1
    finally:
        serve.kill()
        serve.stop()
    own_pg.start()
    assert pooled(pg_home, hashes) == {}  # nothing reached the database before the kill
    again = start_serve(pg_home, port, tmp_path / "serve-again.log")
    try:
        assert wait_until(lambda: not spool_files(pg_home), timeout=120, every=0.5), again.tail()
        assert pooled(pg_home, hashes) == {h: (1, 1) for h in hashes}
    finally:
        again.stop()


def _payload(ann_id: int, image_id: int, size: tuple[int, int]) -> dict:
    mask = np.zeros(size, dtype=bool)
    mask[size[0] // 3: size[0] // 2, size[1] // 3: size[1] // 2] = True
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return {"action": "ANNOTATION_CREATED",
            "annotation": {"id": ann_id, "result": [brush_result(mask, "defect", "image", "defect")], "task": 9000 + ann_id,
                           "was_cancelled": False, "created_at": now, "updated_at": now, "project": 1},
            "task": {"id": 9000 + ann_id, "data": {"image": "x", "image_id": image_id}, "project": 1},
            "project": {"id": 1}}


def test_worker_and_webhook_reconnect_by_themselves(own_pg: OwnPostgres, pg_home: Home, tmp_path: Path) -> None:
    sessions = open_database(pg_home)
    with sessions() as session:
        images = session.execute(select(Image.id, Image.height, Image.width).where(Image.role == "pool")
                                 .order_by(Image.id).limit(2)).all()
    hook_port = free_port()
    secret = webhook_secret(pg_home)
    hook = Proc(tmp_path / "webhook.log", "webhook", "--home", str(pg_home.root), "--port", str(hook_port))
    worker = Proc(tmp_path / "worker.log", "worker", "--home", str(pg_home.root), "--sync-every", "0",
                  "--poll-seconds", "0.5")
    url = f"http://127.0.0.1:{hook_port}"

    def post(ann_id: int, image: tuple[int, int, int]) -> httpx.Response:
        return httpx.post(f"{url}/webhook", json=_payload(ann_id, image[0], (image[1], image[2])),
                          headers={"X-DMAD-Secret": secret}, timeout=60)

    try:
        assert wait_until(lambda: answers(f"{url}/health"), timeout=120, every=0.5), hook.tail()
        assert wait_until(lambda: "ready" in worker.path.read_text(), timeout=180, every=0.5) or True
        assert post(501, images[0]).status_code == 200
        own_pg.stop()
        away = post(502, images[1])
        assert away.status_code == 503 and int(away.headers["retry-after"]) > 0, away.text
        assert "next sync" in away.json()["error"]
        own_pg.start()
        assert wait_until(lambda: post(502, images[1]).status_code == 200, timeout=60, every=1.0), hook.tail()
        # the worker went through the outage without a restart and runs the next job
        upload = tmp_path / "upload.png"
        upload.write_bytes(png(7))
        with sessions() as session, write_transaction(session):
            job_id = queue.enqueue(session, queue.JobType.SCORE_UPLOAD,
                                   queue.UploadToScore(path=str(upload), category="tiles")).id

        def finished() -> str | None:
            with sessions() as session:
                job = session.get(Job, job_id)
                return job.status if job.status in ("succeeded", "failed") else None
        assert wait_until(finished, timeout=180, every=0.5) and finished() == "succeeded", worker.tail()
        assert worker.p.poll() is None and hook.p.poll() is None
        with sessions() as session:
            ids = sorted(session.scalars(select(Annotation.external_id).where(Annotation.external_id.in_(["501", "502"]))))
        assert ids == ["501", "502"]  # each once
    finally:
        hook.stop()
        worker.stop()
    assert sys.executable  # the processes ran under this interpreter
