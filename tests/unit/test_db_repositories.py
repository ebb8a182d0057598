"""Repository helpers on a real SQLite file."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from app.home_folder import Home
from app.services.loop.annotations import delete_annotation, record_annotation
from db import repositories as repo
from db.models import Image, ModelVersion
from dmad_core.errors import UserError
from tests.db_fixtures import home, sqlite_engine, sqlite_sf, sqlite_url, write_png  # noqa: F401


def _version(session: Session, name: str) -> ModelVersion:
    v = ModelVersion(name=name, folder=f"/m/{name}", config={}, status="candidate", trained_on={})
    session.add(v)
    session.flush()
    return v


def check_add_image_is_idempotent(sf: sessionmaker[Session], tmp_path: Path) -> None:
    path = write_png(tmp_path / "good" / "000.png", width=40, height=30, seed=1)
    copy = tmp_path / "elsewhere" / "same-bytes.png"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    with sf() as session:
        a = repo.add_image(session, "bottle", path, "train_normal")
        assert (a.width, a.height, a.role, a.path) == (40, 30, "train_normal", str(path.resolve()))
        assert a.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()
        assert repo.add_image(session, "bottle", copy, "pool") is a  # same bytes, same category
        b = repo.add_image(session, "screw", copy, "evaluation", gt_label=1, defect_type="scratch",
                           gt_mask_path=tmp_path / "gt.png")
        assert b.id != a.id and b.gt_label == 1 and b.gt_mask_path == str((tmp_path / "gt.png").resolve())
        session.commit()
        assert [c.name for c in (a.category, b.category)] == ["bottle", "screw"]
        assert repo.get_or_create_category(session, "bottle").id == a.category_id
        assert [i.id for i in repo.images_by_role(session, "train_normal")] == [a.id]
        assert repo.images_by_role(session, "evaluation", category="bottle") == []
        assert [i.id for i in repo.images_by_role(session, "evaluation", category="screw")] == [b.id]


def check_metrics(sf: sessionmaker[Session], tmp_path: Path) -> None:
    with sf() as session:
        v1, v2 = _version(session, "v0001"), _version(session, "v0002")
        repo.record_metrics(session, v1.id, {"bottle": {"image_auroc": 0.9, "pixel_auroc": 0.8},
                                             "screw": {"image_auroc": 0.7}})
        repo.record_metrics(session, v2.id, {"bottle": {"image_auroc": 0.95, "pro": float("nan")}})
        repo.record_metrics(session, v1.id, {"bottle": {"image_auroc": 0.91}})  # overwrite, no duplicate
        session.commit()
        rows = repo.metric_history(session)
        assert [(r.version, r.category, r.name, r.value) for r in rows] == [
            ("v0001", "bottle", "image_auroc", 0.91), ("v0001", "bottle", "pixel_auroc", 0.8),
            ("v0001", "screw", "image_auroc", 0.7),
            ("v0002", "bottle", "image_auroc", 0.95), ("v0002", "bottle", "pro", None)]
        assert rows[0].created_at.tzinfo is not None and rows[0].activated_at is None


def check_pool_scores(sf: sessionmaker[Session], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with sf() as session:
        imgs = [repo.add_image(session, "bottle" if i % 2 else "screw",
                               write_png(tmp_path / f"p{i}.png", 8, 8, seed=i), "pool") for i in range(6)]
        v = _version(session, "v0001")
        rows = [repo.PoolScoreRow(image_id=im.id, score=float(i), patch_map=rng.random((4, 5)),
                                  top_patches=[{"box": list(np.array([0, 0, 4, 4])), "score": np.float32(i)}],
                                  knn_score=np.float32(i / 2), classifier_score=None if i % 2 else np.float32(-i))
                for i, im in enumerate(imgs)]  # numpy numbers, as scoring code produces them
        assert repo.store_pool_scores(session, v.id, rows) == 6
        session.commit()
        top = repo.top_pool_scores(session, v.id, limit=3)
        assert [p.score for p in top] == [5.0, 4.0, 3.0]
        assert top[0].image.id == imgs[5].id and top[0].map_shape == [4, 5]
        assert [p.top_patches for p in top[:2]] == [[{"box": [0, 0, 4, 4], "score": s}] for s in (5.0, 4.0)]
        np.testing.assert_allclose(top[0].patch_map_array(), rows[5].patch_map, atol=1e-3)
        assert [(p.knn_score, p.classifier_score) for p in top] == [(2.5, None), (2.0, -4.0), (1.5, None)]  # the terms
        assert [p.score for p in repo.top_pool_scores(session, v.id, 10, category="bottle")] == [5.0, 3.0, 1.0]
        assert [p.score for p in repo.top_pool_scores(session, v.id, 10, min_score=3.5)] == [5.0, 4.0]
        # storing again replaces instead of duplicating
        repo.store_pool_scores(session, v.id, [repo.PoolScoreRow(imgs[0].id, 9.0, np.zeros((4, 5)))])
        session.commit()
        assert [p.score for p in repo.top_pool_scores(session, v.id, 2)] == [9.0, 5.0]
        assert len(repo.top_pool_scores(session, v.id, 100)) == 6
        with pytest.raises(ValueError, match="2-D"):
            repo.store_pool_scores(session, v.id, [repo.PoolScoreRow(imgs[0].id, 1.0, np.zeros(3))])


CHECKS = [check_add_image_is_idempotent, check_metrics, check_pool_scores]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_repositories_on_sqlite(check, sqlite_sf, tmp_path) -> None:  # noqa: F811
    check(sqlite_sf, tmp_path)


def test_add_image_refuses_unreadable_files(sqlite_sf, tmp_path) -> None:  # noqa: F811
    bad = tmp_path / "bad.png"
    bad.write_bytes(os.urandom(500))
    with sqlite_sf() as session:
        with pytest.raises(UserError, match="corrupt or unreadable image file"):
            repo.add_image(session, "bottle", bad, "pool")
        with pytest.raises(UserError, match="cannot read image file"):
            repo.add_image(session, "bottle", tmp_path / "missing.png", "pool")
        with pytest.raises(ValueError, match="role"):
            repo.add_image(session, "bottle", bad, "training")  # type: ignore[arg-type]


def test_training_counts_and_trained_on(sqlite_sf, home: Home, tmp_path) -> None:  # noqa: F811
    with sqlite_sf() as session:
        for i in range(3):
            repo.add_image(session, "bottle", write_png(tmp_path / f"n{i}.png", seed=i), "train_normal")
        pool = [repo.add_image(session, "bottle", write_png(tmp_path / f"q{i}.png", seed=10 + i), "pool").id
                for i in range(3)]
        repo.add_image(session, "screw", write_png(tmp_path / "s.png", seed=99), "train_normal")
        session.commit()
        mask = np.zeros((24, 32), bool)
        mask[2:5, 2:5] = True
        a = record_annotation(session, home, image=pool[0], kind="defect_mask", mask=mask)
        record_annotation(session, home, image=pool[1], kind="normal")
        record_annotation(session, home, image=pool[2], kind="defect_no_mask", source="ui", external_id="x")
        delete_annotation(session, home, source="ui", external_id="x")
        counts = repo.training_counts(session)
        assert counts == {
            "bottle": {"normal_images": 3, "defect_masks": 1, "confirmed_normals": 1, "weak_defects": 0},
            "screw": {"normal_images": 1, "defect_masks": 0, "confirmed_normals": 0, "weak_defects": 0}}
        trained_on = repo.build_trained_on(session)
        assert trained_on["categories"] == counts and a.annotation_id in trained_on["annotation_ids"]
        assert len(trained_on["annotation_ids"]) == 2
        v = _version(session, "v0001")
        v.trained_on = trained_on
        session.commit()
        rows = repo.annotation_counts_by_version(session)
        assert [(r.version, r.category, r.normal_images, r.defect_masks, r.confirmed_normals) for r in rows] == [
            ("v0001", "bottle", 3, 1, 1), ("v0001", "screw", 1, 0, 0)]


def test_store_10000_pool_scores_quickly(sqlite_sf) -> None:  # noqa: F811
    with sqlite_sf() as session:
        category = repo.get_or_create_category(session, "bottle")
        session.execute(insert(Image), [
            {"category_id": category.id, "content_hash": f"{i:064x}", "path": f"/pool/{i}.png", "role": "pool",
             "width": 256, "height": 256} for i in range(10_000)])
        v = _version(session, "v0001")
        session.commit()
        ids = list(range(1, 10_001))
        grid = np.random.default_rng(1).random((32, 32)).astype(np.float16)
        rows = [repo.PoolScoreRow(i, float(i % 997), grid, [{"box": [0, 0, 8, 8], "score": 1.0}]) for i in ids]
        start = time.perf_counter()
        repo.store_pool_scores(session, v.id, rows)
        session.commit()
        elapsed = time.perf_counter() - start
        top = repo.top_pool_scores(session, v.id, limit=5)
    assert elapsed < 10, f"storing 10,000 pool scores took {elapsed:.1f} s"
    assert [p.score for p in top] == [996.0] * 5
