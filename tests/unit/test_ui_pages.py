"""Every page of the Streamlit app run headless with AppTest against a prepared home: it renders without
exceptions, shows what it should, and its buttons change the database as promised."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import func, select
from streamlit.testing.v1 import AppTest

from app.home_folder import Home
from app.services.labelstudio import tasks as labelstudio_tasks
from app.services.read import ui_queries as queries
from app.services.loop.annotations import RETRAIN_KEY
from app.ui.diversity import iou, pick_patches
from app.services.imaging import clip_box
from db.models import Annotation, Category, Image, Job, ModelVersion
from db.queue import claim, heartbeat
from db.repositories import untouched_ground_truth
from tests.ui_fixtures import N_TRAIN, PreparedHome, ui_empty_home, ui_home, ui_no_database, ui_template  # noqa: F401

UI = Path(__file__).resolve().parents[2] / "app" / "ui"
HOME_PAGE = UI / "Home.py"
REVIEW = UI / "pages" / "1_Review.py"
INSPECT = UI / "pages" / "2_Inspect.py"
TRAINING = UI / "pages" / "3_Training.py"
METRICS = UI / "pages" / "4_Metrics.py"
ALL_PAGES = [HOME_PAGE, REVIEW, INSPECT, TRAINING, METRICS]


def run(page: Path, **query: str) -> AppTest:
    at = AppTest.from_file(str(page), default_timeout=30)
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    """All the text a user reads on the page, in one string."""
    parts = []
    for kind in ("markdown", "caption", "info", "warning", "error", "success", "title", "subheader"):
        parts.extend(str(e.value) for e in getattr(at, kind))
    return "\n".join(parts)


def select_images(at: AppTest, version_id: int, image_ids: list[int]) -> None:
    for image_id in image_ids:
        at.checkbox(key=f"select-{version_id}-{image_id}").check()


# -- empty homes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: p.stem)
def test_pages_explain_a_missing_database(ui_no_database: Home, page: Path) -> None:  # noqa: F811
    at = run(page)
    assert "No database in" in texts(at) and "dmad init" in texts(at)


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: p.stem)
def test_pages_explain_what_to_do_on_an_empty_home(ui_empty_home: Home, page: Path) -> None:  # noqa: F811
    at = run(page)
    shown = texts(at)
    if page in (HOME_PAGE, REVIEW):
        assert "No data yet: run `dmad ingest DIR`" in shown
    if page in (HOME_PAGE, TRAINING, METRICS):
        assert "No model yet: run `dmad train`" in shown
    if page == TRAINING:
        assert "No jobs yet" in shown
    if page == HOME_PAGE:
        assert "Label Studio is not running: start it with `dmad labelstudio start`" in shown


def test_pages_explain_a_missing_model_once_data_is_in(ui_home: PreparedHome) -> None:  # noqa: F811
    """Images ingested, no model trained yet (the versions removed, with their scores and metrics)."""
    with ui_home.sessions()() as session:
        session.execute(queries.ModelVersion.__table__.delete())
        session.commit()
    for page in (HOME_PAGE, REVIEW, INSPECT, TRAINING, METRICS):
        shown = texts(run(page))
        assert "No data yet" not in shown
        if page != INSPECT:
            assert "No model yet: run `dmad train`" in shown, page.stem
    inspect = run(INSPECT)
    assert "Pick an image by id. No model yet: run `dmad train`" in texts(inspect)
    unannotated = next(i for i in ui_home.defect_ids if i not in ui_home.annotated_ids)
    inspect.number_input(key="inspect-image-id").set_value(unannotated).run()
    assert "No model version has scored this image." in texts(inspect) and len(inspect.get("image")) == 1


def test_review_says_when_the_active_model_has_not_scored_the_pool(ui_home: PreparedHome) -> None:  # noqa: F811
    with ui_home.sessions()() as session:
        session.execute(queries.PoolScore.__table__.delete()
                        .where(queries.PoolScore.version_id == ui_home.version_ids[-1]))
        session.commit()
    shown = texts(run(REVIEW))
    assert f"Re-ranking the pool under v0002: 0 of {len(ui_home.pool_ids)} images" in shown
    assert "No chunk is queued: promote the version again" in shown


def test_review_says_how_far_the_re_ranking_has_got_and_shows_only_the_active_versions_scores(ui_home: PreparedHome) -> None:  # noqa: F811
    with ui_home.sessions()() as session:
        keep = sorted(ui_home.pool_ids)[:5]
        session.execute(queries.PoolScore.__table__.delete()
                        .where(queries.PoolScore.version_id == ui_home.version_ids[-1],
                               queries.PoolScore.image_id.not_in(keep)))
        session.commit()
    at = run(REVIEW)
    assert f"5 of {len(ui_home.pool_ids)} images so far" in texts(at)
    assert "Page (of 1; " in " ".join(w.label for w in at.number_input)


# -- home -------------------------------------------------------------------------------------------
def test_home_overview(ui_home: PreparedHome) -> None:  # noqa: F811
    at = run(HOME_PAGE)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Active model"] == "v0002" and metrics["Model versions"] == "2"
    assert metrics["Images"] == str(len(ui_home.pool_ids) + 2 * N_TRAIN)
    assert "scored **20** pool images" in texts(at)
    assert at.dataframe[0].value.loc["fabric", "pool"] == 10
    assert len(at.get("page_link")) == 4
    # "evaluation": the pool's images with ground truth that no annotation touched (it read 0 as a role)
    with ui_home.sessions()() as session:
        untouched = session.scalar(select(func.count(Image.id)).join(Category).where(
            Category.name == "fabric", *untouched_ground_truth()))
    assert untouched > 0 and at.dataframe[0].value.loc["fabric", "evaluation"] == untouched


# -- review -----------------------------------------------------------------------------------------
REVIEW_CAPTION = (r"\*\*(\d+\.\dx the threshold|[+-]\d+\.\d\d from the threshold)\*\* · "
                  r"(hottest of tiles|on the OK/NG line of tiles|unlike anything labelled|like an image already "
                  r"offered of tiles)(; looks like \d+ parts? already marked normal)?  \n"
                  r"tiles · (good|\w+) · \w+\.png · score -?\d+\.\d{3}")


def test_review_shows_a_grid_of_crops_best_first(ui_home: PreparedHome) -> None:  # noqa: F811
    at = run(REVIEW)
    unreviewed = len(ui_home.pool_ids) - len(ui_home.annotated_ids)
    assert len(at.get("image")) == unreviewed
    boxes = [c.key for c in at.checkbox if c.key.startswith("select-")]
    assert len(boxes) == unreviewed
    first = int(boxes[0].rsplit("-", 1)[1])
    assert first in ui_home.defect_ids
    assert f"[Inspect image {first}](Inspect?image_id={first})" in texts(at)
    assert at.button(key="review-send").disabled and at.button(key="review-mark-normal").disabled


def test_review_filters_and_diversity(ui_home: PreparedHome) -> None:  # noqa: F811
    at = run(REVIEW)
    at.multiselect(key="review-categories").select("tiles").run()
    captions = [c.value for c in at.caption if c.value.startswith("**")]
    assert captions and all("tiles · " in c for c in captions)
    # a caption says why the image is offered, its score against the class's OK/NG threshold, and tells
    # images apart (class, source folder, file)
    for caption in captions:
        assert re.fullmatch(REVIEW_CAPTION, caption), caption
    reasons = {re.fullmatch(REVIEW_CAPTION, c).group(2) for c in captions}
    assert {"hottest of tiles", "on the OK/NG line of tiles"} <= reasons, reasons
    assert any(" · good · " not in c for c in captions)  # some come from a defect folder
    at.number_input(key="review-per-image").set_value(3).run()
    assert not at.exception
    # Up to 3 crops per image, but never two overlapping patches of one image: the grid
    # holds exactly what the diversity rule keeps of each image's stored top patches.
    n_tiles = len([c for c in at.checkbox if c.key.startswith("select-")])
    with ui_home.sessions()() as session:
        rows = queries.review_page(session, queries.ReviewFilter(ui_home.version_ids[-1], ("tiles",)), limit=100)
    kept = {r.image_id: pick_patches(r.top_patches, r.width, r.height, per_image=3) for r in rows}
    assert all(iou(a, b) == 0 for boxes in kept.values() for i, (a, _) in enumerate(boxes)
               for b, _ in boxes[i + 1:])
    assert len(kept) == n_tiles
    assert len(at.get("image")) == sum(len(b) for b in kept.values()) <= 3 * n_tiles
    # every stored patch left out was left out by the rule: it overlaps a shown patch of its image, or the
    # image already shows 3 (whether the model's top patches of one image overlap depends on its output, so
    # the rule itself is pinned on hand-made patches in test_ui_imaging.py)
    for r in rows:
        shown = [box for box, _ in kept[r.image_id]]
        assert shown and len(shown) <= 3
        for patch in r.top_patches:
            box = clip_box(patch["box"], r.width, r.height)
            assert box in shown or len(shown) == 3 or any(iou(box, s) > 0 for s in shown), (r.image_id, box)
    at.checkbox(key="review-hide-annotated").uncheck().run()
    assert len([c for c in at.checkbox if c.key.startswith("select-")]) == 10
    slider = at.slider(key=f"review-min-score-{ui_home.version_ids[-1]}")
    with ui_home.sessions()() as session:
        top = queries.review_page(
            session, queries.ReviewFilter(ui_home.version_ids[-1], ("tiles",), hide_annotated=False), limit=1)[0]
    slider.set_value(top.score).run()
    assert [c.key for c in at.checkbox if c.key.startswith("select-")] == \
        [f"select-{ui_home.version_ids[-1]}-{top.image_id}"]


def test_review_mark_normal_annotates_and_queues_a_retrain(ui_home: PreparedHome) -> None:  # noqa: F811
    at = run(REVIEW)
    version_id = ui_home.version_ids[-1]
    chosen = [int(c.key.rsplit("-", 1)[1]) for c in at.checkbox if c.key.startswith("select-")][:2]
    select_images(at, version_id, chosen)
    at.run()
    at.button(key="review-mark-normal").click().run()
    assert not at.exception
    assert "2 image(s) marked normal; retrain job #" in texts(at)
    with ui_home.sessions()() as session:
        rows = session.scalars(select(Annotation).where(Annotation.source == "ui")).all()
        jobs = session.scalars(select(Job).where(Job.type.not_in(("train", "rerank")))).all()
    assert sorted(a.image_id for a in rows) == sorted(chosen) and {a.kind for a in rows} == {"normal"}
    assert [(j.type, j.status, j.coalesce_key) for j in jobs] == [("retrain", "queued", RETRAIN_KEY)]
    shown = [int(c.key.rsplit("-", 1)[1]) for c in at.checkbox if c.key.startswith("select-")]
    assert not set(chosen) & set(shown)  # reviewed images leave the grid


def test_review_send_without_label_studio_says_how_to_start_it(ui_home: PreparedHome) -> None:  # noqa: F811
    at = run(REVIEW)
    first = next(c for c in at.checkbox if c.key.startswith("select-"))
    first.check().run()
    at.button(key="review-send").click().run()
    assert not at.exception
    assert any("Label Studio is not running" in e.value and "dmad labelstudio start" in e.value for e in at.error)


class FakeLabelStudio:
    """Just the calls `push_tasks` and `task_ids` make, recording imported tasks."""

    def __init__(self) -> None:
        self.imported: list[dict[str, Any]] = []
        self.tasks = SimpleNamespace(list=self._list)
        self.projects = SimpleNamespace(import_tasks=self._import)

    def _list(self, project: int, fields: str | None = None, page: int = 1, page_size: int = 100) -> SimpleNamespace:
        """One page, shaped like the SDK's pager (``items``, ``response.total``)."""
        tasks = [SimpleNamespace(id=100 + i, data=t["data"]) for i, t in enumerate(self.imported)]
        return SimpleNamespace(items=tasks[(page - 1) * page_size:page * page_size],
                               response=SimpleNamespace(total=len(tasks)))

    def _import(self, project_id: int, request: list[dict[str, Any]]) -> None:
        self.imported.extend(request)


def test_review_send_creates_tasks_and_links_to_them(ui_home: PreparedHome,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeLabelStudio()
    monkeypatch.setattr(labelstudio_tasks, "connect",
                        lambda home: labelstudio_tasks.Connection(fake, 7, "http://127.0.0.1:8080"))
    at = run(REVIEW)
    chosen = [int(c.key.rsplit("-", 1)[1]) for c in at.checkbox if c.key.startswith("select-")][:2]
    select_images(at, ui_home.version_ids[-1], chosen)
    at.run()
    assert any(c.value.startswith("2 selected · model v0002") for c in at.caption)
    at.button(key="review-send").click().run()
    assert not at.exception
    assert "2 new task(s) in Label Studio project 7, 0 already there" in texts(at)
    # the header counts what is still ticked: nothing, after the send
    assert any(c.value.startswith("0 selected · model v0002") for c in at.caption)
    assert sorted(t["data"]["image_id"] for t in fake.imported) == sorted(chosen)
    assert {t["data"]["model_version"] for t in fake.imported} == {"v0002"}
    assert "http://127.0.0.1:8080/projects/7/data?task=100" in texts(at)
    assert "http://127.0.0.1:8080/projects/7/data?task=101" in texts(at)
    # the sent images carry a mark in the grid until they are annotated; the others carry none
    waiting = [c.value for c in at.caption if "waiting in Label Studio" in c.value]
    assert len(waiting) == 2
    assert {"(task 100)", "(task 101)"} == {w[w.index("(task"):] for w in waiting}
    at.checkbox(key=f"select-{ui_home.version_ids[-1]}-{chosen[0]}").check().run()
    at.button(key="review-send").click().run()
    assert "0 new task(s) in Label Studio project 7, 1 already there" in texts(at)


def test_review_pagination(ui_home: PreparedHome) -> None:  # noqa: F811
    from tests.ui_fixtures import add_bulk_pool

    add_bulk_pool(ui_home, n=120)
    at = run(REVIEW)
    first_page = [c.key for c in at.checkbox if c.key.startswith("select-")]
    assert len(first_page) == 30 and len(at.get("image")) == 30
    page = at.number_input(key="review-page")
    assert page.max == 5  # 134 unreviewed images, 30 a page
    page.set_value(5).run()
    last_page = [c.key for c in at.checkbox if c.key.startswith("select-")]
    assert len(last_page) == 14 and not set(last_page) & set(first_page)
    at.multiselect(key="review-categories").select("bulk").run()
    assert at.number_input(key="review-page").value == 1  # a new filter starts from the top


# -- inspect ----------------------------------------------------------------------------------------
def test_inspect_an_image_by_query_parameter(ui_home: PreparedHome) -> None:  # noqa: F811
    image_id = ui_home.annotated_ids[0]
    at = run(INSPECT, image_id=str(image_id))
    assert at.number_input(key="inspect-image-id").value == image_id
    shown = texts(at)
    assert f"image {image_id}" in shown and "defect_mask" in shown
    assert len(at.get("image")) == 2  # the heat map view and the annotated mask
    assert len(at.get("vega_lite_chart")) == 1  # score history
    axis_formats = re.findall(r'"format":\s*"([^"]*)"', at.get("vega_lite_chart")[0].proto.spec)
    assert axis_formats and all(re.fullmatch(r"\.[0-4]f", f) for f in axis_formats if f.endswith("f"))
    assert at.metric[0].label == "Score (v0002)"
    # the pool image's verdict by its class's threshold under the version shown
    assert any(" under v0002: the class's threshold is " in e.value for e in [*at.warning, *at.success])
    at.selectbox(key="inspect-version").select("v0001").run()
    assert at.metric[0].label == "Score (v0001)"
    assert any(" under v0001: the class's threshold is " in e.value for e in [*at.warning, *at.success])
    at.slider(key="inspect-opacity").set_value(0.9).run()
    assert not at.exception
    # three of the stored top patches are drawn by default (eight covered the defect they point at)
    listed = [c.value for c in at.caption if c.value.startswith("Top patches: ")]
    assert len(listed) == 1 and listed[0].count(": ") == 1 + 3
    at.number_input(key="inspect-boxes").set_value(0).run()
    assert not [c for c in at.caption if c.value.startswith("Top patches: ")]


def test_inspect_defaults_to_the_top_image_and_handles_unknown_ids(ui_home: PreparedHome) -> None:  # noqa: F811
    at = run(INSPECT)
    assert at.number_input(key="inspect-image-id").value in ui_home.defect_ids
    at.number_input(key="inspect-image-id").set_value(999_999).run()
    assert not at.exception and "There is no image 999999." in texts(at)


def test_inspect_shows_an_upload_job_then_its_result(ui_home: PreparedHome) -> None:  # noqa: F811
    sessions = ui_home.sessions()
    with sessions() as session:
        info = queries.image_info(session, ui_home.defect_ids[0])
        job = queries.enqueue_score_upload(session, info.path, info.category)
    at = AppTest.from_file(str(INSPECT), default_timeout=30)
    at.session_state["inspect-upload-job"] = job.id
    at.run()
    assert not at.exception
    assert [p.proto.text for p in at.get("progress")] == ["waiting for a worker to pick it up"]

    claim(sessions, "worker-1", types=["score_upload"])
    heartbeat(sessions, job.id, "worker-1", 0.5, "scoring")
    at.run()
    assert [p.proto.text for p in at.get("progress")] == ["scoring"]

    grid = [[0.3] * 16 for _ in range(16)]
    grid[4][5] = 1.0
    with sessions() as session:
        row = session.get(Job, job.id)
        row.status, row.progress = "succeeded", 1.0
        row.result = {"score": 1.0, "patch_map": grid, "decision": "NG", "threshold": 0.5,
                      "threshold_source": "calibrated", "version": "v0002",
                      "top_patches": [{"box": [32, 24, 56, 48], "score": 1.0}]}
        session.commit()
    at.run()
    assert not at.exception
    assert any(m.label == "Score (v0002)" and m.value == "1.0000" for m in at.metric)
    assert any("**NG** under v0002: the class's threshold is 0.5000 (calibrated)" in w.value for w in at.warning)
    assert not at.get("progress")


def test_inspect_upload_scored_by_the_real_worker(ui_home: PreparedHome) -> None:  # noqa: F811
    """An uploaded defect image, scored by `dmad worker`'s own code (run once, in this process): the page
    shows the model's score against its threshold and the heat map."""
    import threading

    from app.ui.uploads import save_upload
    from app.worker import WorkerOptions, run_worker

    sessions = ui_home.sessions()
    with sessions() as session:
        info = queries.image_info(session, ui_home.defect_ids[-1])
    path = save_upload(ui_home.home, "line-camera.png", Path(info.path).read_bytes())
    with sessions() as session:
        job = queries.enqueue_score_upload(session, path, info.category)
    assert run_worker(ui_home.home, sessions, WorkerOptions(once=True, sync_every_seconds=None),
                      threading.Event()) == 1
    at = AppTest.from_file(str(INSPECT), default_timeout=30)
    at.session_state["inspect-upload-job"] = job.id
    at.run()
    assert not at.exception
    with sessions() as session:
        stored = queries.job(session, job.id)
    assert stored.result is not None and "result" not in stored.payload  # the result has a column of its own
    result = stored.result
    assert any(m.label == "Score (v0002)" and m.value == f"{result['score']:.4f}" for m in at.metric)
    assert f"Job #{job.id} (score_upload) for `{path}`: **succeeded**" in texts(at)
    assert any(f"**{result['decision']}** under v0002: the class's threshold is {result['threshold']:.4f}" in e.value
               for e in [*at.warning, *at.success])
    assert len(at.get("image")) >= 2  # the inspected image and the upload with its heat map


def test_inspect_shows_a_failed_upload_job(ui_home: PreparedHome) -> None:  # noqa: F811
    with ui_home.sessions()() as session:
        job = queries.enqueue_score_upload(session, "/nowhere.png", "tiles")
        row = session.get(Job, job.id)
        row.status, row.message, row.error = "failed", "failed after 3 attempts", "no such file"
        session.commit()
    at = AppTest.from_file(str(INSPECT), default_timeout=30)
    at.session_state["inspect-upload-job"] = job.id
    at.run()
    assert any("no such file" in e.value for e in at.error)


# -- training ---------------------------------------------------------------------------------------
def test_training_retrain_now_queues_one_job(ui_home: PreparedHome) -> None:  # noqa: F811
    at = run(TRAINING)
    assert not at.get("progress")  # v0001's training job is done: no bar, a row in the table
    assert list(at.dataframe[0].value["type"]) == ["train"]
    at.button(key="training-retrain").click().run()
    with ui_home.sessions()() as session:
        jobs = session.scalars(select(Job).where(Job.type.not_in(("train", "rerank")))).all()
    assert f"Retrain job #{jobs[0].id} is queued" in texts(at)
    at.button(key="training-retrain").click().run()  # joins the waiting one
    with ui_home.sessions()() as session:
        jobs = session.scalars(select(Job).where(Job.type.not_in(("train", "rerank")))).all()
    assert [(j.type, j.status, j.coalesce_key) for j in jobs] == [("retrain", "queued", RETRAIN_KEY)]
    assert [p.proto.text for p in at.get("progress")] == [f"#{jobs[0].id} retrain · queued · waiting for a worker"]


def test_training_shows_running_jobs_with_progress(ui_home: PreparedHome) -> None:  # noqa: F811
    sessions = ui_home.sessions()
    with sessions() as session:
        job = queries.enqueue_retrain(session)
        done = queries.enqueue_score_upload(session, "/x.png", "tiles")
        row = session.get(Job, done.id)
        row.status, row.message = "succeeded", "done"
        session.commit()
    claim(sessions, "worker-1", types=["retrain"])
    heartbeat(sessions, job.id, "worker-1", 0.4, "fitting the mapper")
    at = run(TRAINING)
    bars = at.get("progress")
    assert [b.proto.text for b in bars] == [f"#{job.id} retrain · running · fitting the mapper"]
    assert bars[0].proto.value == 40
    finished = at.dataframe[0].value  # newest first, v0001's training last
    assert list(finished["job"])[0] == done.id and list(finished["type"]) == ["score_upload", "train"]
    assert list(finished["status"]) == ["succeeded", "succeeded"]


def test_training_folds_routine_label_studio_syncs_into_one_line(ui_home: PreparedHome) -> None:  # noqa: F811
    """The worker syncs with Label Studio every minute: succeeded syncs must not push the trainings out of
    the table; they are counted in one caption, and a failed sync still shows as a row."""
    sessions = ui_home.sessions()
    with sessions() as session:
        for i in range(60):  # an hour of syncs, more than the table's limit
            session.add(Job(type="labelstudio_sync", status="succeeded", payload={}, progress=1.0,
                            message=f"pulled {i % 2} annotation(s)", finished_at=datetime.now(timezone.utc)))
        session.add(Job(type="labelstudio_sync", status="failed", payload={}, error="Label Studio is not running"))
        session.commit()
    at = run(TRAINING)
    finished = at.dataframe[0].value
    assert list(finished["type"]) == ["labelstudio_sync", "train"] and list(finished["status"]) == ["failed", "succeeded"]
    assert "finished" in finished.columns and "progress" not in finished.columns
    assert any("Label Studio sync: 60 run(s) succeeded" in c.value and "pulled 1 annotation(s)" in c.value
               for c in at.caption)


def test_training_queue_polls_while_idle_and_shows_a_job_queued_elsewhere(ui_home: PreparedHome,  # noqa: F811
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The job queue must poll even when nothing runs, or a retrain queued by the Label Studio webhook only
    shows after a manual Refresh. AppTest runs whole scripts and never fires a fragment's `run_every`
    timer (nor exposes the auto-rerun message), so the interval each run asks for is read by wrapping
    `st.fragment`; the runs themselves stand in for the timer's reruns."""
    import streamlit as st

    asked: dict[str, list[Any]] = {}
    real_fragment = st.fragment

    def spy(func: Any = None, **kwargs: Any) -> Any:
        def register(f: Any) -> Any:
            asked.setdefault(f.__name__, []).append(kwargs.get("run_every"))
            return real_fragment(f, **kwargs)
        return register if func is None else register(func)

    monkeypatch.setattr(st, "fragment", spy)
    at = run(TRAINING)
    assert asked == {"job_queue": [5]}  # idle, yet polling (it was None: no timer at all)
    assert not at.get("progress")

    sessions = ui_home.sessions()
    with sessions() as session:  # what the webhook receiver does on an annotation
        job = queries.enqueue_retrain(session)
    at.run()
    assert not at.exception
    assert [p.proto.text for p in at.get("progress")] == [f"#{job.id} retrain · queued · waiting for a worker"]
    assert asked["job_queue"][-1] == 2  # busy: faster

    claim(sessions, "worker-1", types=["retrain"])
    heartbeat(sessions, job.id, "worker-1", 0.7, "evaluating")
    at.run()
    assert [p.proto.text for p in at.get("progress")] == [f"#{job.id} retrain · running · evaluating"]
    with sessions() as session:
        row = session.get(Job, job.id)
        row.status, row.progress = "succeeded", 1.0
        session.commit()
    at.run()
    assert not at.exception and not at.get("progress")
    assert asked["job_queue"][-1] == 5  # idle again, still polling
    assert list(at.dataframe[0].value["job"])[0] == job.id


def test_training_versions_promote_and_roll_back(ui_home: PreparedHome) -> None:  # noqa: F811
    at = run(TRAINING)
    table = next(d.value for d in at.dataframe if "name" in d.value.columns)  # the versions table
    assert list(table["name"]) == ["v0002", "v0001"] and list(table["status"]) == ["active", "retired"]
    assert "2 masks" in table.iloc[0]["trained on"]

    at.selectbox(key="training-promote-version").select("v0001")
    at.button(key="training-promote").click().run()
    assert "v0001 is now the active version." in texts(at)
    with ui_home.sessions()() as session:
        assert queries.active_version_info(session).name == "v0001"

    # the selector offers what is promotable now (v0002), not the choice just promoted
    assert at.selectbox(key="training-promote-version").value == "v0002"

    at.button(key="training-rollback").click().run()
    assert "Rolled back: v0002 is the active version again." in texts(at)
    with ui_home.sessions()() as session:
        assert queries.active_version_info(session).name == "v0002"

    at.button(key="training-rollback").click().run()
    at.button(key="training-rollback").click().run()
    assert any("nothing to roll back to" in e.value for e in at.error)
    assert not at.exception


def test_training_promote_selector_offers_a_version_that_became_promotable(ui_home: PreparedHome) -> None:  # noqa: F811
    """The selector once kept the empty choice of a run with nothing to promote, and said "no other
    version to promote" beside a retired, promotable version."""
    def set_status(name: str, status: str) -> None:
        with ui_home.sessions()() as session:
            session.query(ModelVersion).filter_by(name=name).one().status = status
            session.commit()

    set_status("v0001", "failed")
    at = run(TRAINING)
    assert at.selectbox(key="training-promote-version").options == []
    set_status("v0001", "retired")
    at.run()
    assert at.selectbox(key="training-promote-version").value == "v0001"
    at.button(key="training-promote").click().run()
    assert "v0001 is now the active version." in texts(at)


# -- metrics ----------------------------------------------------------------------------------------
def test_metrics_history_and_latest_values(ui_home: PreparedHome) -> None:  # noqa: F811
    at = run(METRICS)
    assert len(at.get("vega_lite_chart")) == 1
    spec = at.get("vega_lite_chart")[0].proto.spec
    assert '"tableau10"' in spec  # classes in distinct hues
    # percent axes whose decimals follow each metric's range (a fixed ".1%" gave nine "98.6%" ticks)
    formats = re.findall(r'"format":\s*"(\.[0-2]%)"', spec)
    assert len(formats) == 3 and '".1~%"' not in spec
    assert at.multiselect(key="metrics-names").value == ["image_auroc", "pixel_auroc", "pro"]
    assert "Latest values (v0002)" in texts(at)
    bought = at.dataframe[0].value  # first, each version against its parent on the same images
    assert set(bought["version"]) == {"v0002"} and set(bought["against"]) == {"v0001"}
    assert set(bought["class"]) == {"fabric", "tiles"} and set(bought["scores moved"]) <= {"yes", "no"}
    latest = next(d.value for d in at.dataframe if "image_auroc" in d.value.columns)
    assert list(latest.index) == ["fabric", "tiles"]
    assert latest.max().max() > 1.0 and latest.max().max() <= 100.0  # in percent, as the charts
    at.radio(key="metrics-axis").set_value("creation time").run()
    at.multiselect(key="metrics-names").select("image_f1max").run()
    assert not at.exception
    at.multiselect(key="metrics-categories").unselect("tiles").unselect("fabric").run()
    assert "Choose at least one metric and one category" in texts(at)


def test_training_shows_thresholds_with_their_rates_and_takes_an_override(ui_home: PreparedHome) -> None:  # noqa: F811
    at = run(TRAINING)
    limits = at.dataframe[-1].value
    assert list(limits["class"]) == ["fabric", "tiles"] and set(limits["source"]) == {"calibrated"}
    assert list(limits["annotated defects"]) == [2, 2] and limits["misses, annotated defects (%)"].notna().all()
    # no "None" cells: a missing rate is a number's NaN (an empty cell), a missing note an empty text
    assert limits["false alarms, confirmed normals (%)"].dtype.kind == "f" and list(limits["note"]) == ["", ""]
    shown = at.dataframe[-1].proto  # short headers, so the table fits the page; "–" where a rate has no images
    assert '"false alarms (val.)"' in shown.columns and '"misses (annotated)"' in shown.columns
    assert shown.placeholder == "–"
    at.selectbox(key="threshold-class").select("tiles").run()
    at.number_input(key="threshold-value-tiles").set_value(123.0).run()
    at.text_input(key="threshold-note").input("trial on line 3").run()
    at.button(key="threshold-set").click().run()
    assert not at.exception
    assert "tiles: threshold of v0002 set to 123.0000." in texts(at)
    limits = at.dataframe[-1].value.set_index("class")
    assert limits.loc["tiles", "source"] == "override" and limits.loc["tiles", "threshold"] == 123.0
    assert limits.loc["tiles", "misses, annotated defects (%)"] == 100.0  # nothing scores that high
    assert limits.loc["tiles", "note"] == "trial on line 3"
    at.button(key="threshold-reset").click().run()
    assert at.dataframe[-1].value.set_index("class").loc["tiles", "source"] == "calibrated"
