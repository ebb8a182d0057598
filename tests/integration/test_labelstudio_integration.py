"""Against a real Label Studio: process management, project, tasks with pre-annotations, webhooks, sync.

One server for the whole module (see tests/labelstudio_fixtures.py); the tests build on each other's
project but each checks its own facts. Images are small non-square PNGs (200 x 310) made here.
"""

from __future__ import annotations

import functools
import json
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import requests

from annotation.project import (
    SECRET_HEADER,
    STATE_FILE,
    TaskItem,
    ensure_project,
    ensure_webhook,
    image_url_for,
    push_tasks,
)
from annotation.rle import brush_result, rle_to_mask
from annotation.server import PASSWORD_SECRET, TOKEN_SECRET, LabelStudioServer
from annotation.sink import MemorySink
from annotation.sync import sync_annotations
from annotation.webhook import WebhookServer, make_webhook_server, serve_in_thread
from app.home_folder import Home
from app.services.database import open_database
from app.services.labelstudio.home import label_studio_server
from dmad_core.errors import UserError
from tests.labelstudio_fixtures import (
    SampleImage,
    blob_mask,
    label_studio_bin_or_skip,
    write_test_images,
)
from tests.loop_fixtures import LoopHome, copy_home, trained_home_template  # noqa: F401 (fixture)
from tests.processes import free_port, wait_until

pytestmark = pytest.mark.integration

TITLE = "DMAD integration"
LABELS = ("scratch", "dent")
SECRET = "integration-secret"


@dataclass
class Setup:
    server: LabelStudioServer
    client: Any
    project_id: int
    images: list[SampleImage]
    sink: MemorySink


class Receiver:
    """Our webhook receiver on a fixed port, so it can be stopped and started again at the same URL."""

    def __init__(self, sink: MemorySink, lookup: dict[str, Path]) -> None:
        self.sink = sink
        self.lookup = lookup
        self.port = free_port()
        self.server: WebhookServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = make_webhook_server("127.0.0.1", self.port, self.sink, SECRET, image_path=self.lookup.get)
        serve_in_thread(self.server)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[SampleImage]:
    return write_test_images(tmp_path_factory.mktemp("images"), 4)


@pytest.fixture(scope="module")
def receiver(images: list[SampleImage]) -> Iterator[Receiver]:
    sink = MemorySink({im.image_id: (im.height, im.width) for im in images})
    rec = Receiver(sink, {im.content_hash: im.path for im in images})
    rec.start()
    yield rec
    rec.stop()


@pytest.fixture(scope="module")
def setup(labelstudio: LabelStudioServer, images: list[SampleImage], receiver: Receiver) -> Setup:  # noqa: F811
    client = labelstudio.client()
    project_id = ensure_project(client, TITLE, LABELS,
                               state_path=labelstudio.paths.data_dir / STATE_FILE)
    ensure_webhook(client, project_id, f"{receiver.url}/webhook", SECRET)
    return Setup(labelstudio, client, project_id, images, receiver.sink)


def _api(server: LabelStudioServer, method: str, path: str, **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"Token {server.token()}"}
    return requests.request(method, f"{server.url}{path}", headers=headers, timeout=30, **kwargs)


_wait_for = functools.partial(wait_until, timeout=10.0, every=0.1)


def _task_for(setup: Setup, image: SampleImage) -> dict[str, Any]:
    for task in setup.client.tasks.list(project=setup.project_id, fields="all"):
        if task.data.get("content_hash") == image.content_hash:
            return task.model_dump()
    raise AssertionError(f"no task for image {image.image_id}")


# -- process management ----------------------------------------------------------------------------
def test_port_in_use_is_refused_and_nothing_starts(tmp_path: Path) -> None:
    executable = label_studio_bin_or_skip()
    home = Home.at(tmp_path / "home")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = label_studio_server(home, port=port, bin=executable)
        with pytest.raises(UserError, match="already in use"):
            server.start(timeout=60)
    assert server.status().running is False
    assert not server.pid_path.exists()
    assert not server.database_path.exists()
    assert home.read_secret(TOKEN_SECRET) is None


def test_token_works_is_private_and_is_not_logged(labelstudio: LabelStudioServer) -> None:  # noqa: F811
    status = labelstudio.status()
    assert status.running and status.healthy
    assert _api(labelstudio, "GET", "/api/projects").status_code == 200
    wrong = requests.get(f"{labelstudio.url}/api/projects", timeout=30,
                         headers={"Authorization": "Token " + "0" * 40})
    assert wrong.status_code == 401
    home = Home.at(labelstudio.paths.owner)
    for name in (TOKEN_SECRET, PASSWORD_SECRET):
        assert stat.S_IMODE((home.secrets_dir / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(home.secrets_dir.stat().st_mode) == 0o700
    token = labelstudio.token()
    assert token not in labelstudio.log_path.read_text()
    assert token.encode() not in Path(f"/proc/{status.pid}/cmdline").read_bytes()
    # it answers on the port we asked for, nowhere else
    assert requests.get(f"http://127.0.0.1:{labelstudio.port}/health", timeout=10).status_code == 200


# -- project ----------------------------------------------------------------------------------------
def test_project_and_webhook_are_idempotent(setup: Setup, receiver: Receiver) -> None:
    client, server = setup.client, setup.server
    state = server.paths.data_dir / STATE_FILE
    assert ensure_project(client, TITLE, LABELS, state_path=state) == setup.project_id
    state.unlink()  # lost state: found again by title
    assert ensure_project(client, TITLE, LABELS, state_path=state) == setup.project_id
    assert state.exists()
    assert [p.id for p in client.projects.list() if p.title == TITLE] == [setup.project_id]
    config = client.projects.get(setup.project_id).label_config
    assert '<Label value="scratch"/>' in config and '<Label value="dent"/>' in config

    first = ensure_webhook(client, setup.project_id, f"{receiver.url}/webhook", SECRET)
    assert ensure_webhook(client, setup.project_id, f"{receiver.url}/webhook", SECRET) == first
    hooks = [h for h in client.webhooks.list(project=str(setup.project_id)) if h.url == f"{receiver.url}/webhook"]
    assert len(hooks) == 1 and hooks[0].headers == {SECRET_HEADER: SECRET} and hooks[0].send_payload


# -- tasks ------------------------------------------------------------------------------------------
def test_push_twice_creates_no_duplicates_and_masks_survive(setup: Setup, receiver: Receiver) -> None:
    items = [
        TaskItem(image_id=im.image_id, content_hash=im.content_hash, category="bottle",
                 image_url=image_url_for(receiver.url, im.content_hash), width=im.width, height=im.height,
                 score=0.5 + im.image_id / 10, model_version="v0001", normal_percentile=im.image_id / 10,
                 heatmap_mask=blob_mask(im.height, im.width, seed=im.image_id) if im.image_id != 4 else None)
        for im in setup.images
    ]
    first = push_tasks(setup.client, setup.project_id, items, label="scratch")
    assert (first.created, first.skipped_existing) == (4, 0)
    second = push_tasks(setup.client, setup.project_id, items + items[:1], label="scratch")
    assert (second.created, second.skipped_existing) == (0, 5)
    tasks = [t.model_dump() for t in setup.client.tasks.list(project=setup.project_id, fields="all")]
    assert sorted(t["data"]["image_id"] for t in tasks) == [1, 2, 3, 4]

    # paging through the tasks stops at the total: never a request for a page past the last (a 404 with a
    # traceback in Label Studio's log each time the worker synced)
    pages: list[int] = []
    real_list = setup.client.tasks.list

    def recording_list(**kwargs):  # noqa: ANN003, ANN202
        pages.append(kwargs["page"])
        return real_list(**kwargs)

    for page_size, expected in ((3, [1, 2]), (4, [1]), (100, [1])):
        pages.clear()
        setup.client.tasks.list = recording_list
        try:
            import annotation.project as project_module
            saved, project_module.TASK_PAGE_SIZE = project_module.TASK_PAGE_SIZE, page_size
            found = sorted(t.data["image_id"] for t in project_module.iter_tasks(setup.client, setup.project_id))
        finally:
            project_module.TASK_PAGE_SIZE = saved
            del setup.client.tasks.list
        assert found == [1, 2, 3, 4] and pages == expected, (page_size, pages)

    for task in tasks:
        image = setup.images[task["data"]["image_id"] - 1]
        assert task["data"]["content_hash"] == image.content_hash
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "v0001"
        assert prediction["score"] == pytest.approx(image.image_id / 10)  # the percentile, 0-1
        assert task["data"]["score"] == pytest.approx(0.5 + image.image_id / 10)  # the raw score, as data
        if image.image_id == 4:
            assert prediction["result"] == []
            continue
        (result,) = prediction["result"]
        assert (result["original_height"], result["original_width"]) == (200, 310)
        assert result["value"]["brushlabels"] == ["scratch"]
        decoded = rle_to_mask(result["value"]["rle"], image.height, image.width)
        assert np.array_equal(decoded, blob_mask(image.height, image.width, seed=image.image_id))
        # the image reaches the labelling UI through our receiver, by content hash
        served = requests.get(task["data"]["image"], timeout=10)
        assert served.status_code == 200 and served.content == image.path.read_bytes()


# -- annotations: webhook and sync ------------------------------------------------------------------
def test_inspector_annotation_arrives_by_webhook_pixel_for_pixel(setup: Setup) -> None:
    image = setup.images[0]
    task = _task_for(setup, image)
    drawn = blob_mask(image.height, image.width, seed=101)
    response = _api(setup.server, "POST", f"/api/tasks/{task['id']}/annotations/",
                    json={"result": [brush_result(drawn, "defect", "image", "dent")], "lead_time": 12.5})
    assert response.status_code == 201, response.text
    ann_id = str(response.json()["id"])
    assert _wait_for(lambda: ann_id in setup.sink.rows)
    row = setup.sink.rows[ann_id]
    assert (row.image_id, row.kind) == (image.image_id, "defect_mask")
    assert row.mask is not None and row.mask.shape == (200, 310)
    assert np.array_equal(row.mask, drawn)

    # the inspector changes their mind: an explicit "normal" wins over the mask left in place
    verdict = {"type": "choices", "from_name": "verdict", "to_name": "image", "value": {"choices": ["normal"]}}
    patched = _api(setup.server, "PATCH", f"/api/annotations/{ann_id}/",
                   json={"result": [brush_result(drawn, "defect", "image", "dent"), verdict]})
    assert patched.status_code == 200, patched.text
    assert _wait_for(lambda: setup.sink.rows[ann_id].kind == "normal")

    assert _api(setup.server, "DELETE", f"/api/annotations/{ann_id}/").status_code == 204
    assert _wait_for(lambda: ann_id not in setup.sink.rows)


def test_annotations_made_while_the_receiver_is_down_are_synced(setup: Setup, receiver: Receiver) -> None:
    receiver.stop()
    drawn: dict[str, np.ndarray] = {}
    try:
        for image in setup.images[1:3]:
            task = _task_for(setup, image)
            mask = blob_mask(image.height, image.width, seed=200 + image.image_id)
            response = _api(setup.server, "POST", f"/api/tasks/{task['id']}/annotations/",
                            json={"result": [brush_result(mask, "defect", "image", "scratch")]})
            assert response.status_code == 201, response.text  # Label Studio carries on without us
            drawn[str(response.json()["id"])] = mask
        task = _task_for(setup, setup.images[3])
        verdict = {"type": "choices", "from_name": "verdict", "to_name": "image", "value": {"choices": ["defect"]}}
        response = _api(setup.server, "POST", f"/api/tasks/{task['id']}/annotations/", json={"result": [verdict]})
        assert response.status_code == 201
        no_mask_id = str(response.json()["id"])
    finally:
        receiver.start()
    assert not set(drawn) & set(setup.sink.rows)  # nothing arrived while it was down

    report = sync_annotations(setup.client, setup.project_id, setup.sink)
    assert (report.created, report.deleted, report.failed) == (3, 0, ())
    for ann_id, mask in drawn.items():
        assert setup.sink.rows[ann_id].kind == "defect_mask"
        assert np.array_equal(setup.sink.rows[ann_id].mask, mask)
    assert setup.sink.rows[no_mask_id].kind == "defect_no_mask"

    again = sync_annotations(setup.client, setup.project_id, setup.sink)
    assert (again.created, again.updated, again.unchanged, again.deleted) == (0, 0, 3, 0)

    # deleted in Label Studio while we were not listening: the sync removes it
    receiver.stop()
    try:
        gone = next(iter(drawn))
        assert _api(setup.server, "DELETE", f"/api/annotations/{gone}/").status_code == 204
    finally:
        receiver.start()
    assert gone in setup.sink.rows
    assert sync_annotations(setup.client, setup.project_id, setup.sink).deleted == 1
    assert gone not in setup.sink.rows

    # and the receiver is back: a new annotation arrives by webhook again
    image = setup.images[0]
    task = _task_for(setup, image)
    response = _api(setup.server, "POST", f"/api/tasks/{task['id']}/annotations/", json={"result": [
        {"type": "choices", "from_name": "verdict", "to_name": "image", "value": {"choices": ["normal"]}}]})
    assert _wait_for(lambda: str(response.json()["id"]) in setup.sink.rows)


def test_cli_push_webhook_and_sync_on_the_database(labelstudio: LabelStudioServer,  # noqa: F811
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The `dmad` commands end to end: a real database with an active version and pool scores, pushed
    as tasks, annotated through the API, received by `dmad webhook` (a subprocess), then synced."""
    from app.cli import main
    from app.home_folder import HomeSettings
    from app.services.labelstudio.home import webhook_secret
    from dmad_core.preannotation import UNDRAWN_PEAK_SHARE, heatmap_mask
    from app.services.loop.versions import commit_version, new_version_dir
    from db.engine import make_engine, session_factory, upgrade_to_head
    from db.models import Annotation
    from db.repositories import PoolScoreRow, add_image, store_pool_scores

    home = Home.at(labelstudio.paths.owner)
    webhook_port = free_port()
    home.save_settings(HomeSettings(webhook_port=webhook_port, defect_labels=("defect", "crack")))
    upgrade_to_head(home.db_url())
    engine = make_engine(home.db_url())
    sessions = session_factory(engine)
    pool = write_test_images(tmp_path / "pool", 3, height=180, width=250)
    grids = {}
    with sessions() as session:
        rows = [add_image(session, "bottle", im.path, "pool") for im in pool]
        session.commit()
        name, folder = new_version_dir(home, session)
        version = commit_version(session, home, name, folder, {"pixel_threshold": 0.5}, None, {}, status="active")
        for i, row in enumerate(rows):
            grid = np.zeros((8, 8), dtype=np.float32)
            grid[2 + i : 5 + i, 1:4] = 1.0
            grids[row.id] = grid
        store_pool_scores(session, version.id, [PoolScoreRow(image_id=r.id, score=0.9 - 0.1 * i, patch_map=grids[r.id])
                                                for i, r in enumerate(rows)])
        session.commit()
        image_ids = [r.id for r in rows]

    def dmad(*argv: str) -> dict[str, Any]:
        capsys.readouterr()
        assert main([*argv, "--home", str(home.root), "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    started = dmad("labelstudio", "start")  # already running: sets up the default project and webhook
    assert started["running"] and started["pid"] == labelstudio.status().pid
    project_id = started["project_id"]
    pushed = dmad("labelstudio", "push")
    assert (pushed["created"], pushed["skipped_existing"], pushed["pre_annotation_masks"]) == (3, 0, True)
    assert dmad("labelstudio", "push")["created"] == 0

    client = labelstudio.client()
    tasks = {t.data["image_id"]: t.model_dump() for t in client.tasks.list(project=project_id, fields="all")}
    assert sorted(tasks) == sorted(image_ids)
    for image_id, task in tasks.items():
        (result,) = task["predictions"][0]["result"]
        expected = heatmap_mask(grids[image_id], 180, 250, 0.5, peak_share=UNDRAWN_PEAK_SHARE)  # no drawn masks
        assert expected.any()
        assert np.array_equal(rle_to_mask(result["value"]["rle"], 180, 250), expected)
        assert task["data"]["image"] == f"http://127.0.0.1:{webhook_port}/images/{task['data']['content_hash']}"

    receiver = subprocess.Popen([sys.executable, "-m", "app.cli", "webhook", "--home", str(home.root)],
                                cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    try:
        assert _wait_for(lambda: _answers(f"http://127.0.0.1:{webhook_port}/health"), timeout=30)
        image_id = image_ids[0]
        served = requests.get(tasks[image_id]["data"]["image"], timeout=10)
        assert served.status_code == 200 and served.content == pool[0].path.read_bytes()
        drawn = blob_mask(180, 250, seed=7)
        response = _api(labelstudio, "POST", f"/api/tasks/{tasks[image_id]['id']}/annotations/",
                        json={"result": [brush_result(drawn, "defect", "image", "crack")]})
        assert response.status_code == 201
        first_id = str(response.json()["id"])

        def stored() -> set[str]:
            with sessions() as session:
                return {a.external_id for a in session.query(Annotation).filter(Annotation.deleted_at.is_(None))}

        assert _wait_for(lambda: first_id in stored())
        unauthorised = requests.post(f"http://127.0.0.1:{webhook_port}/webhook", json={"action": "x"}, timeout=10)
        assert unauthorised.status_code == 401
    finally:
        receiver.terminate()
        receiver.wait(timeout=30)
    assert webhook_secret(home) not in receiver.stdout.read().decode()  # type: ignore[union-attr]

    response = _api(labelstudio, "POST", f"/api/tasks/{tasks[image_ids[1]]['id']}/annotations/", json={"result": [
        {"type": "choices", "from_name": "verdict", "to_name": "image", "value": {"choices": ["normal"]}}]})
    second_id = str(response.json()["id"])
    assert second_id not in stored()
    synced = dmad("labelstudio", "sync")
    assert (synced["created"], synced["unchanged"], synced["deleted"], synced["failed"]) == (1, 1, 0, [])
    assert stored() == {first_id, second_id}
    with sessions() as session:
        kinds = {a.external_id: (a.kind, a.source, a.image_id) for a in session.query(Annotation)}
    assert kinds[first_id] == ("defect_mask", "labelstudio", image_ids[0])
    assert kinds[second_id] == ("normal", "labelstudio", image_ids[1])
    status = dmad("labelstudio", "status")
    assert status["running"] and status["healthy"] and status["project_id"] == project_id
    engine.dispose()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_webhook_annotation_on_a_trained_home_retrains_and_promotes(
        labelstudio: LabelStudioServer, trained_home_template: LoopHome, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """The loop through Label Studio on a home with a real model: push the top pool images with the
    model's heat maps, an inspector draws the defect, `dmad webhook` stores it and queues the retrain,
    `dmad worker --once` runs it, and the new active version was trained on that annotation."""
    from app.cli import main
    from db.models import Annotation, Image

    loop = copy_home(trained_home_template, tmp_path / "home")
    home = loop.home
    for name in (TOKEN_SECRET, PASSWORD_SECRET):  # the module's server, with this home's own project
        home.write_secret(name, Home.at(labelstudio.paths.owner).read_secret(name) or "")
    webhook_port = free_port()
    home.save_settings(replace(home.load_settings(), label_studio_port=labelstudio.port, webhook_port=webhook_port,
                               label_studio_project="DMAD loop integration"))

    def dmad(*argv: str) -> dict[str, Any]:
        capsys.readouterr()
        assert main([*argv, "--home", str(home.root), "--json"]) == 0
        out = capsys.readouterr().out
        return json.loads(out[out.index("{"):])  # progress lines, if any, come before the JSON

    first = dmad("status")["active_version"]
    pushed = dmad("labelstudio", "push", "--top", "4")
    assert (pushed["created"], pushed["model_version"], pushed["pre_annotation_masks"]) == (4, first["name"], True)
    project_id = pushed["project_id"]
    client = labelstudio.client()
    tasks = sorted((t.model_dump() for t in client.tasks.list(project=project_id, fields="all")),
                   key=lambda t: -t["data"]["score"])
    assert all(0.0 <= t["predictions"][0]["score"] <= 1.0 for t in tasks)  # a percentile Label Studio can show
    assert len(tasks) == 4 and all(t["predictions"][0]["model_version"] == first["name"] for t in tasks)
    top = tasks[0]
    sessions = open_database(home)
    with sessions() as session:
        image = session.get(Image, top["data"]["image_id"])
        assert image is not None and image.content_hash == top["data"]["content_hash"]
        height, width, gt_mask_path = image.height, image.width, image.gt_mask_path
    # the inspector draws the defect where the dataset's ground truth has it (or a blob on a good image)
    drawn = (np.asarray(PIL.Image.open(gt_mask_path)) > 0) if gt_mask_path else blob_mask(height, width, seed=3)
    label = home.load_settings().defect_labels[0]

    receiver = subprocess.Popen([sys.executable, "-m", "app.cli", "webhook", "--home", str(home.root)],
                                cwd=Path(__file__).resolve().parents[2], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
    try:
        assert _wait_for(lambda: _answers(f"http://127.0.0.1:{webhook_port}/health"), timeout=30)
        response = _api(labelstudio, "POST", f"/api/tasks/{top['id']}/annotations/",
                        json={"result": [brush_result(drawn, "defect", "image", label)]})
        assert response.status_code == 201, response.text
        external_id = str(response.json()["id"])

        def stored() -> Annotation | None:
            with sessions() as session:
                return session.query(Annotation).filter_by(external_id=external_id).one_or_none()

        assert _wait_for(lambda: stored() is not None, timeout=30)
    finally:
        receiver.terminate()
        receiver.wait(timeout=30)
    annotation = stored()
    assert annotation is not None and (annotation.kind, annotation.image_id) == ("defect_mask", image.id)
    queue = dmad("status")["queue"]
    assert queue["queued"] == 1 and queue["recent"][0]["type"] == "retrain"

    assert main(["worker", "--once", "--sync-every", "0", "--home", str(home.root)]) == 0
    status = dmad("status")
    second = status["active_version"]
    assert second["name"] != first["name"] and second["parent_id"] == first["id"]
    assert annotation.id in second["trained_on"]["annotation_ids"]
    assert status["queue"]["succeeded"] >= 1 and status["queue"]["queued"] == 0
    for rows in status["metrics"].values():  # both versions' metrics recorded side by side
        assert {first["name"], second["name"]} <= {row["version"] for row in rows}

    # the annotated image is not sent again; the next push carries the new version's predictions
    again = dmad("labelstudio", "push", "--top", "5")
    assert again["model_version"] == second["name"]
    hashes = [t.data["content_hash"] for t in client.tasks.list(project=project_id, fields="all")]
    assert len(hashes) == len(set(hashes)) == 4 + again["created"]


def test_secrets_never_reach_the_log(labelstudio: LabelStudioServer) -> None:  # noqa: F811
    """Last in the module: the log now holds a whole session of requests, webhooks and failures."""
    log_text = labelstudio.log_path.read_text()
    assert "Starting development server" in log_text
    for name in (TOKEN_SECRET, PASSWORD_SECRET):
        secret = Home.at(labelstudio.paths.owner).read_secret(name)
        assert secret and secret not in log_text
    assert SECRET not in log_text


def test_a_promotion_gives_waiting_tasks_the_new_versions_proposal(labelstudio: LabelStudioServer,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    """A task pushed under one version, then a newer one promoted and its re-ranking scoring the image: the
    task an inspector opens now carries the newer version's mask and score only (the older prediction is gone); a task already
    annotated keeps what the inspector saw. Its own database and project, so it depends on no other test."""
    from app.home_folder import HomeSettings
    from app.services.loop.annotations import record_annotation
    from app.services.labelstudio.tasks import push_top, refresh_tasks
    from app.services.loop.versions import commit_version, new_version_dir
    from db.engine import make_engine, session_factory, upgrade_to_head
    from db.repositories import PoolScoreRow, add_image, store_pool_scores
    from dmad_core.preannotation import UNDRAWN_PEAK_SHARE, heatmap_mask

    home = Home.at(labelstudio.paths.owner)
    saved = home.load_settings() if home.settings_path.exists() else None
    home.save_settings(HomeSettings(db_url=f"sqlite:///{tmp_path / 'refresh.db'}", webhook_port=free_port(),
                                    label_studio_project="DMAD refresh", defect_labels=("defect",)))
    try:
        upgrade_to_head(home.db_url())
        sessions = session_factory(make_engine(home.db_url()))
        pool = write_test_images(tmp_path / "pool", 3, height=120, width=160)

        def grid(row: int) -> np.ndarray:
            g = np.zeros((8, 8), dtype=np.float32)
            g[row:row + 3, 2:5] = 1.0
            return g

        def publish(scores: dict[int, tuple[float, np.ndarray]]) -> str:
            with sessions() as session:
                name, folder = new_version_dir(home, session)
                version = commit_version(session, home, name, folder, {"pixel_threshold": 0.5}, None, {},
                                         status="active")
                store_pool_scores(session, version.id, [PoolScoreRow(image_id=i, score=s, patch_map=g)
                                                        for i, (s, g) in scores.items()])
                session.commit()
                return name

        with sessions() as session:
            ids = [add_image(session, "bottle", im.path, "pool").id for im in pool]
            session.commit()
        first = publish({i: (0.9 - 0.1 * k, grid(0)) for k, i in enumerate(ids)})  # names: the home's folders
        pushed = push_top(home, sessions)
        assert pushed.created == 3 and pushed.model_version == first
        with sessions() as session:  # an inspector has answered the last task already
            record_annotation(session, home, image=ids[-1], kind="normal", source="cli", enqueue_retrain=False)

        second = publish({i: (0.5 + 0.1 * k, grid(4)) for k, i in enumerate(ids)})
        assert refresh_tasks(home, sessions, ids) == 2  # what the re-ranking chunk of these images does
        assert refresh_tasks(home, sessions, ids) == 0  # nothing is stale any more

        client = labelstudio.client()
        project = next(p for p in client.projects.list() if p.title == "DMAD refresh")
        tasks = {t.data["image_id"]: t.model_dump() for t in client.tasks.list(project=project.id, fields="all")}
        for k, image_id in enumerate(ids):
            predictions = tasks[image_id]["predictions"]
            want = first if image_id == ids[-1] else second
            assert [p["model_version"] for p in predictions] == [want], image_id
            assert tasks[image_id]["data"]["model_version"] == want
            (result,) = predictions[0]["result"]
            expected = heatmap_mask(grid(0 if want == first else 4), 120, 160, 0.5, peak_share=UNDRAWN_PEAK_SHARE)
            assert np.array_equal(rle_to_mask(result["value"]["rle"], 120, 160), expected)
        assert tasks[ids[0]]["data"]["score"] == pytest.approx(0.5)
    finally:
        if saved is None:
            home.settings_path.unlink(missing_ok=True)
        else:
            home.save_settings(saved)
