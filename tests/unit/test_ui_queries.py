"""The UI's queries on a prepared home: a real database, real images, two versions."""

from __future__ import annotations

from sqlalchemy import select

from app.services.read import ui_queries as queries
from app.services.loop.annotations import RETRAIN_KEY
from db.models import Job
from tests.ui_fixtures import N_DEFECT, N_GOOD, N_TRAIN, PreparedHome, add_bulk_pool, ui_home, ui_template  # noqa: F401


def test_review_page_is_best_first_and_pages_without_overlap(ui_home: PreparedHome) -> None:  # noqa: F811
    with ui_home.sessions()() as session:
        flt = queries.ReviewFilter(ui_home.version_ids[-1], hide_annotated=False)
        assert queries.review_count(session, flt) == len(ui_home.pool_ids)
        first = queries.review_page(session, flt, limit=5)
        second = queries.review_page(session, flt, limit=5, offset=5)
    scores = [r.score for r in first + second]
    assert scores == sorted(scores, reverse=True)
    assert not {r.image_id for r in first} & {r.image_id for r in second}
    top = first[0]
    assert top.patch_map.dtype.name == "float16" and top.patch_map.ndim == 2 and min(top.patch_map.shape) >= 8
    assert top.top_patches and len(top.top_patches[0]["box"]) == 4
    assert top.image_id in ui_home.defect_ids  # the model ranks a defect first


def test_review_filters(ui_home: PreparedHome) -> None:  # noqa: F811
    version_id = ui_home.version_ids[-1]
    with ui_home.sessions()() as session:
        lo, hi = queries.score_range(session, version_id)
        everything = queries.review_count(session, queries.ReviewFilter(version_id, hide_annotated=False))
        unreviewed = queries.review_page(session, queries.ReviewFilter(version_id), limit=100)
        tiles = queries.review_page(session, queries.ReviewFilter(version_id, ("tiles",), hide_annotated=False),
                                    limit=100)
        high = queries.review_page(
            session, queries.ReviewFilter(version_id, min_score=(lo + hi) / 2, hide_annotated=False), limit=100)
    assert lo < hi
    assert len(unreviewed) == everything - len(ui_home.annotated_ids)
    assert not {r.image_id for r in unreviewed} & set(ui_home.annotated_ids)
    assert tiles and {r.category for r in tiles} == {"tiles"}
    assert high and min(r.score for r in high) >= (lo + hi) / 2 and len(high) < everything


def test_bulk_pool_pages_stay_small(ui_home: PreparedHome) -> None:  # noqa: F811
    add_bulk_pool(ui_home, n=300)
    with ui_home.sessions()() as session:
        flt = queries.ReviewFilter(ui_home.version_ids[-1], ("bulk",))
        assert queries.review_count(session, flt) == 300
        assert len(queries.review_page(session, flt, limit=50, offset=280)) == 20


def test_image_views(ui_home: PreparedHome) -> None:  # noqa: F811
    image_id = ui_home.annotated_ids[0]
    with ui_home.sessions()() as session:
        info = queries.image_info(session, image_id)
        history = queries.score_history(session, image_id)
        annotations = queries.image_annotations(session, image_id)
        scored = queries.image_score(session, image_id, ui_home.version_ids[-1])
        rank, pool = queries.score_rank(session, ui_home.version_ids[-1], scored.score)
        assert queries.image_info(session, 10**6) is None
        assert queries.top_image_id(session, ui_home.version_ids[-1]) in ui_home.defect_ids
    assert info.role == "pool" and info.gt_label == 1 and info.name.endswith(".png")
    assert list(history["version"]) == ["v0001", "v0002"]
    assert [a.kind for a in annotations] == ["defect_mask"]  # readable after the session closed
    assert 1 <= rank <= pool == len(ui_home.pool_ids)


def test_overview_and_versions(ui_home: PreparedHome) -> None:  # noqa: F811
    with ui_home.sessions()() as session:
        info = queries.overview(session)
        table = queries.versions_frame(session)
    assert info.active.name == "v0002" and info.n_versions == 2
    assert info.pool_scored == len(ui_home.pool_ids)
    assert info.n_annotations == len(ui_home.annotated_ids)
    assert info.images.loc["tiles", "pool"] == N_GOOD + N_DEFECT and info.images.loc["tiles", "train_normal"] == N_TRAIN
    assert info.images.loc["tiles", "annotated defect (mask)"] == 2
    assert list(table["name"]) == ["v0002", "v0001"]
    assert table.iloc[0]["trained on"] == f"fabric: {N_TRAIN} normal, 2 masks, 1 confirmed normal; " \
                                          f"tiles: {N_TRAIN} normal, 2 masks, 1 confirmed normal"
    assert table.iloc[1]["trained on"] == f"fabric: {N_TRAIN} normal; tiles: {N_TRAIN} normal"
    assert queries.trained_on_summary({}) == "-"


def test_enqueue_retrain_coalesces(ui_home: PreparedHome) -> None:  # noqa: F811
    with ui_home.sessions()() as session:
        first = queries.enqueue_retrain(session)
        again = queries.enqueue_retrain(session)
        upload = queries.enqueue_score_upload(session, "/tmp/x.png", "tiles")
        assert queries.any_active_job(session)
        rows = session.scalars(select(Job).where(Job.type.not_in(("train", "rerank"))).order_by(Job.id)).all()  # not v0001's
    assert first.id == again.id and first.status == "queued"
    assert [(j.type, j.coalesce_key) for j in rows] == [("retrain", RETRAIN_KEY), ("score_upload", None)]
    assert upload.payload == {"path": "/tmp/x.png", "category": "tiles"}


def test_metric_frames(ui_home: PreparedHome) -> None:  # noqa: F811
    with ui_home.sessions()() as session:
        metrics = queries.metric_frame(session)
        trained = queries.training_data_frame(session)
    assert set(metrics["metric"]) == set(queries.METRIC_NAMES)
    assert set(metrics["version"]) == {"v0001", "v0002"}
    version, latest = queries.latest_metrics(metrics)
    assert version == "v0002" and list(latest.index) == ["fabric", "tiles"]
    assert list(latest.columns) == list(queries.METRIC_NAMES)
    by_version = trained.groupby("version")["annotations"].sum()
    assert by_version["v0001"] == 0 and by_version["v0002"] == len(ui_home.annotated_ids)
    none, empty = queries.latest_metrics(metrics.iloc[0:0])
    assert none is None and empty.empty


def test_images_sent_to_label_studio_are_marked_until_annotated(ui_home: PreparedHome) -> None:  # noqa: F811
    from db.repositories import record_label_tasks

    version_id = ui_home.version_ids[-1]
    annotated = ui_home.annotated_ids[0]
    waiting, unknown_id = [i for i in ui_home.pool_ids if i not in ui_home.annotated_ids][:2]
    with ui_home.sessions()() as session:
        assert record_label_tasks(session, 7, "v0002", [(waiting, 41), (unknown_id, None), (annotated, 43)]) == 3
        # sent again: no new row; a task id read back later fills the one that had none
        assert record_label_tasks(session, 7, "v0002", [(waiting, 41), (unknown_id, 42)]) == 0
        session.commit()
        rows = queries.review_page(session, queries.ReviewFilter(version_id, hide_annotated=False), limit=1000)
    marks = {r.image_id: r.waiting_task for r in rows}
    assert marks[waiting] == 41 and marks[unknown_id] == 42
    assert marks[annotated] is None  # annotated already: no longer waiting
    assert sum(m is not None for m in marks.values()) == 2
