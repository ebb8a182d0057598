"""Promote first, re-rank after (issue 15): a retrain promotes after a bounded evaluation, the pool is ranked
under the new version in chunks on the queue, a newer promotion supersedes an older re-ranking, and the
Review queries never show a mix of versions."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

from sqlalchemy import func, select

from app.home_folder import Home
from app.services.read import ui_queries
from app.services.database import open_database
from app.services.line.inference import LoadedModel
from app.services.loop.reranking import prune_pool_scores, rerank_chunk, rerank_progress
from app.services.loop.training import evaluation_set, train_version
from app.services.loop.versions import active_version
from app.worker import rerank_now
from db import queue
from db.models import Image, Job, ModelVersion, PoolScore
from tests.loop_fixtures import LoopHome, trained_home, trained_home_template  # noqa: F401


def _settings(home: Home, **changes) -> None:
    home.save_settings(replace(home.load_settings(), **changes))


def _scores(session, version_id: int) -> dict[int, float]:
    return dict(session.execute(select(PoolScore.image_id, PoolScore.score).where(PoolScore.version_id == version_id)).all())


def _chunks(session, status: str | None = None) -> list[Job]:
    query = select(Job).where(Job.type == queue.JobType.RERANK).order_by(Job.id)
    if status is not None:
        query = query.where(Job.status == status)
    return list(session.scalars(query))


def test_a_retrain_promotes_before_ranking_the_pool_and_its_chunks_rank_it(trained_home: LoopHome) -> None:
    home = trained_home.home
    _settings(home, evaluation_max_per_label=1, rerank_chunk_images=4)
    sessions = open_database(home)
    with sessions() as session:
        v1 = active_version(session)
        v1_scores = _scores(session, v1.id)
        pool = int(session.scalar(select(func.count(Image.id)).where(Image.role == "pool")))
    assert len(v1_scores) == pool  # `dmad train` ranked the whole pool before it returned

    outcome = train_version(home, sessions, warm_start=True)
    with sessions() as session:
        v2 = session.get(ModelVersion, outcome.version_id)
        assert v2.status == "active"
        progress = rerank_progress(session, v2.id)
        # the retrain scored only its evaluation set: one image per class and label (2 classes x 2 labels)
        assert progress.scored == 4 and progress.pool == pool and not progress.complete
        chunks = _chunks(session, "queued")
        assert progress.chunks_open == len(chunks) == -(-(pool - 4) // 4)
        assert all(job.priority < 0 for job in chunks)
        # the first chunk holds the images the previous version ranked highest (among those not scored yet)
        scored_now = set(_scores(session, v2.id))
        expected = sorted((i for i in v1_scores if i not in scored_now), key=lambda i: (-v1_scores[i], i))[:4]
        assert chunks[0].payload["image_ids"] == expected
        # Review shows only the active version's scores, and says how far they go
        shown = ui_queries.review_page(session, ui_queries.ReviewFilter(v2.id, hide_annotated=False), limit=100)
        assert {row.version_id for row in shown} == {v2.id} and len(shown) == 4
        note = ui_queries.rerank_note(v2.name, ui_queries.rerank_progress(session, v2.id))
        assert f"4 of {pool} images" in note and v2.name in note

    assert rerank_now(home, sessions) == len(chunks)
    with sessions() as session:
        progress = rerank_progress(session, outcome.version_id)
        assert progress.complete and progress.chunks_open == 0
        assert set(_scores(session, outcome.version_id)) == set(v1_scores)
        assert {j.status for j in _chunks(session)} == {"succeeded"}
        assert all(j.attempts == 1 for j in _chunks(session))


def test_a_newer_promotion_supersedes_the_older_re_ranking(trained_home: LoopHome) -> None:
    home = trained_home.home
    _settings(home, evaluation_max_per_label=1, rerank_chunk_images=4)
    sessions = open_database(home)
    v2 = train_version(home, sessions, warm_start=True)
    running = queue.claim(sessions, "worker-a", [queue.JobType.RERANK])  # a worker is in the middle of v2's first chunk
    assert running is not None and running.payload["version_id"] == v2.version_id

    v3 = train_version(home, sessions, warm_start=True)
    with sessions() as session:
        old = [j for j in _chunks(session) if j.payload["version_id"] == v2.version_id]
        assert old and {j.status for j in old} == {"cancelled"}
        assert all("superseded: " + v3.version in j.message for j in old)
        new = _chunks(session, "queued")
        assert new and {j.payload["version_id"] for j in new} == {v3.version_id}
        v2_partial = _scores(session, v2.version_id)
    # the worker learns it at its next heartbeat, and a stale chunk run anyway stores nothing
    assert not queue.heartbeat(sessions, running.id, "worker-a", 0.5, "scoring")
    message = rerank_chunk(home, sessions, running.id, queue.payload_of(running), LoadedModel())
    assert message.startswith("skipped")
    with sessions() as session:
        assert _scores(session, v2.version_id) == v2_partial
        shown = ui_queries.review_page(session, ui_queries.ReviewFilter(v3.version_id, hide_annotated=False), limit=500)
        assert {row.version_id for row in shown} == {v3.version_id}

    rerank_now(home, sessions)
    with sessions() as session:
        assert rerank_progress(session, v3.version_id).complete
        assert _scores(session, v2.version_id) == v2_partial  # the superseded ranking was never completed


def test_pool_scores_of_versions_no_longer_kept_are_removed(trained_home: LoopHome) -> None:
    home = trained_home.home
    _settings(home, evaluation_max_per_label=1, rerank_chunk_images=16, pool_score_versions_kept=1)
    sessions = open_database(home)
    with sessions() as session:
        v1_id = active_version(session).id
    v2 = train_version(home, sessions, warm_start=True)
    with sessions() as session:
        assert _scores(session, v1_id)  # kept while v2's ranking is incomplete: Inspect still has it
    rerank_now(home, sessions)
    with sessions() as session:
        assert not _scores(session, v1_id)
        assert rerank_progress(session, v2.version_id).complete
        assert prune_pool_scores(session, 1) == 0


def test_the_evaluation_set_is_bounded_stratified_and_the_same_for_every_version(trained_home: LoopHome) -> None:
    sessions = open_database(trained_home.home)
    with sessions() as session:
        everything = evaluation_set(session, 10_000)
        chosen = evaluation_set(session, 3)
        again = evaluation_set(session, 3)
    groups: dict[tuple[str, int], list[Image]] = {}
    for img in everything:
        groups.setdefault((img.category.name, img.gt_label), []).append(img)
    assert len(groups) == 4
    assert [img.id for img in chosen] == [img.id for img in again]
    for key, members in groups.items():
        picked = [img for img in chosen if (img.category.name, img.gt_label) == key]
        assert sorted(img.content_hash for img in picked) == sorted(img.content_hash for img in members)[:3]


def test_rerank_stores_no_pool_features_when_the_pool_cannot_fit_in_the_cache(trained_home: LoopHome) -> None:
    home = trained_home.home
    _settings(home, evaluation_max_per_label=1, rerank_chunk_images=64, feature_cache_max_bytes=1)
    sessions = open_database(home)
    with sessions() as session:
        pool = list(session.scalars(select(Image).where(Image.role == "pool", Image.gt_label.is_not(None))))
        model_dir = Path(active_version(session).folder)
    cache_dir = home.features_dir
    cached = {p.stem: p for p in cache_dir.rglob("*.npy")}
    for img in pool:
        cached[img.content_hash].unlink()  # as if evicted
    v2 = train_version(home, sessions, warm_start=True)
    rerank_now(home, sessions)
    with sessions() as session:
        assert rerank_progress(session, v2.version_id).complete
    left = {p.stem for p in cache_dir.rglob("*.npy")}
    scored_by_chunks = [img for img in pool if img.content_hash not in left]
    assert len(scored_by_chunks) >= len(pool) - 4  # only the evaluation set's few may have been stored
    assert model_dir.is_dir()


def test_published_version_files_are_read_only(trained_home: LoopHome) -> None:
    sessions = open_database(trained_home.home)
    with sessions() as session:
        folder = Path(active_version(session).folder)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert not os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), path
