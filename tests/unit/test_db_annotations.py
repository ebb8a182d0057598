"""The annotation service, on a real SQLite file, real image files and a real masks folder."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.home_folder import Home
from app.services.loop import annotations as svc
from app.services.loop.annotations import AnnotationError, find_image, load_mask, record_annotation
from db import queue
from db.models import Annotation, Image, Job
from dmad_core.errors import UserError
from tests.db_fixtures import add_test_image, home, sqlite_engine, sqlite_sf, sqlite_url  # noqa: F401

T0 = datetime(2025, 3, 1, 9, 0, 0, tzinfo=UTC)
W, H = 32, 24


def defect(y0: int = 4, x0: int = 6, size: int = 5) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y0 + size, x0:x0 + size] = True
    return m


def counts(session: Session) -> tuple[int, int]:
    """(annotation rows, retrain jobs)."""
    session.expire_all()
    return (session.scalar(select(func.count(Annotation.id))),
            session.scalar(select(func.count(Job.id)).where(Job.type == "retrain")))


def mask_files(home: Home) -> list[str]:  # noqa: F811
    return sorted(p.name for p in home.masks_dir.iterdir())


def check_create_defect_mask(sf: sessionmaker[Session], home: Home, tmp_path: Path) -> None:  # noqa: F811
    with sf() as session:
        image = add_test_image(session, tmp_path, "a", width=W, height=H)
        session.commit()
        res = record_annotation(session, home, image=image.id, kind="defect_mask", mask=defect())
        assert res.outcome == "created" and res.job_id is not None
        ann = session.get(Annotation, res.annotation_id)
        assert (ann.kind, ann.source, ann.image_id, ann.deleted_at) == ("defect_mask", "cli", image.id, None)
        assert ann.mask_path == str(home.masks_dir / f"{ann.id}.png")
        png = np.asarray(PIL.Image.open(ann.mask_path))
        assert png.shape == (H, W) and set(np.unique(png)) == {0, 255}
        np.testing.assert_array_equal(load_mask(ann, home), defect())
        job = session.get(Job, res.job_id)
        assert (job.type, job.status, job.coalesce_key) == ("retrain", "queued", "retrain")
        assert mask_files(home) == [f"{ann.id}.png"]  # no temp or backup files left


def check_every_change_enqueues_one_coalesced_retrain(sf: sessionmaker[Session], home: Home,  # noqa: F811
                                                     tmp_path: Path) -> None:
    with sf() as session:
        imgs = [add_test_image(session, tmp_path, f"i{i}", width=W, height=H).id for i in range(4)]
        session.commit()
        results = [record_annotation(session, home, image=im, kind="normal", source="labelstudio",
                                     external_id=str(i), source_updated_at=T0) for i, im in enumerate(imgs)]
        assert {r.outcome for r in results} == {"created"}
        assert len({r.job_id for r in results}) == 1
        assert counts(session) == (4, 1)
    job = queue.claim(sf, "worker")  # the retrain starts ...
    assert job is not None and job.id == results[0].job_id
    with sf() as session:  # ... and new changes queue exactly one more
        r1 = record_annotation(session, home, image=imgs[0], kind="defect_no_mask", source="labelstudio",
                               external_id="0", source_updated_at=T0 + timedelta(seconds=1))
        assert svc.delete_annotation(session, home, source="labelstudio", external_id="1")
        r2 = record_annotation(session, home, image=imgs[2], kind="defect_mask", mask=defect(),
                               source="labelstudio", external_id="2", source_updated_at=T0 + timedelta(seconds=1))
        assert (r1.outcome, r2.outcome) == ("updated", "updated")
        assert r1.job_id == r2.job_id != job.id
        assert counts(session) == (4, 2)
        queued = session.scalars(select(Job).where(Job.status == "queued")).all()
        assert [j.id for j in queued] == [r1.job_id]


def check_idempotent_and_reordered_deliveries(sf: sessionmaker[Session], home: Home,  # noqa: F811
                                              tmp_path: Path) -> None:
    with sf() as session:
        image = add_test_image(session, tmp_path, "b", width=W, height=H)
        session.commit()
        kw = dict(image=image.id, source="labelstudio", external_id="ann-17")
        first = record_annotation(session, home, kind="defect_mask", mask=defect(), source_updated_at=T0, **kw)
        path = home.masks_dir / f"{first.annotation_id}.png"
        stamp = path.stat().st_mtime_ns
        updated_at = session.get(Annotation, first.annotation_id).updated_at

        again = record_annotation(session, home, kind="defect_mask", mask=defect(), source_updated_at=T0, **kw)
        assert (again.annotation_id, again.outcome, again.job_id) == (first.annotation_id, "unchanged", None)
        assert path.stat().st_mtime_ns == stamp
        assert session.get(Annotation, first.annotation_id).updated_at == updated_at

        newer = record_annotation(session, home, kind="defect_mask", mask=defect(10, 10, 3),
                                  source_updated_at=T0 + timedelta(minutes=5), **kw)
        assert (newer.annotation_id, newer.outcome) == (first.annotation_id, "updated")
        assert newer.job_id == first.job_id  # still waiting: coalesced
        np.testing.assert_array_equal(load_mask(session.get(Annotation, first.annotation_id), home), defect(10, 10, 3))

        # a delayed delivery of an older revision must not overwrite the newer one
        older = record_annotation(session, home, kind="normal", source_updated_at=T0 + timedelta(minutes=1), **kw)
        assert (older.outcome, older.job_id) == ("unchanged", None)
        ann = session.get(Annotation, first.annotation_id)
        assert ann.kind == "defect_mask" and ann.source_updated_at == T0 + timedelta(minutes=5)
        np.testing.assert_array_equal(load_mask(ann, home), defect(10, 10, 3))

        # newer revision switching to 'normal': the mask goes, atomically with the row
        to_normal = record_annotation(session, home, kind="normal", source_updated_at=T0 + timedelta(minutes=9), **kw)
        assert to_normal.outcome == "updated"
        ann = session.get(Annotation, first.annotation_id)
        assert (ann.kind, ann.mask_path, ann.mask_sha256) == ("normal", None, None)
        assert mask_files(home) == []
        assert counts(session) == (1, 1)


def check_no_times_compares_content(sf: sessionmaker[Session], home: Home, tmp_path: Path) -> None:  # noqa: F811
    with sf() as session:
        image = add_test_image(session, tmp_path, "c", width=W, height=H)
        session.commit()
        kw = dict(image=image.id, source="ui", external_id="u1")
        a = record_annotation(session, home, kind="defect_mask", mask=defect(), **kw)
        b = record_annotation(session, home, kind="defect_mask", mask=defect().astype(np.uint8) * 255, **kw)
        c = record_annotation(session, home, kind="defect_mask", mask=defect(0, 0, 2), **kw)
        assert [a.outcome, b.outcome, c.outcome] == ["created", "unchanged", "updated"]


def check_cli_without_external_id(sf: sessionmaker[Session], home: Home, tmp_path: Path) -> None:  # noqa: F811
    with sf() as session:
        image = add_test_image(session, tmp_path, "d", width=W, height=H)
        other = add_test_image(session, tmp_path, "e", width=W, height=H)
        session.commit()
        a = record_annotation(session, home, image=image.id, kind="defect_mask", mask=defect())
        b = record_annotation(session, home, image=image.path, kind="defect_mask", mask=defect().astype(np.uint8))
        assert (a.outcome, b.outcome, b.annotation_id, b.job_id) == ("created", "unchanged", a.annotation_id, None)
        c = record_annotation(session, home, image=image.id, kind="normal")  # a new verdict replaces the old
        assert (c.outcome, c.annotation_id) == ("updated", a.annotation_id)
        d = record_annotation(session, home, image=image.id, kind="normal")
        assert d.outcome == "unchanged"
        e = record_annotation(session, home, image=other.id, kind="normal")
        assert e.outcome == "created" and e.annotation_id != a.annotation_id
        f = record_annotation(session, home, image=image.id, kind="normal", source="ui")  # other source: its own
        assert f.outcome == "created"
        assert [x.id for x in svc.active_annotations(session)] == [a.annotation_id, e.annotation_id, f.annotation_id]


def check_delete(sf: sessionmaker[Session], home: Home, tmp_path: Path) -> None:  # noqa: F811
    with sf() as session:
        image = add_test_image(session, tmp_path, "f", width=W, height=H)
        session.commit()
        kw = dict(image=image.id, source="labelstudio", external_id="9")
        created = record_annotation(session, home, kind="defect_mask", mask=defect(), source_updated_at=T0, **kw)
        queue_ids = set(session.scalars(select(Job.id)))
        assert svc.delete_annotation(session, home, source="labelstudio", external_id="9") is True
        assert svc.delete_annotation(session, home, source="labelstudio", external_id="9") is False
        assert svc.delete_annotation(session, home, source="labelstudio", external_id="nope") is False
        assert set(session.scalars(select(Job.id))) == queue_ids  # the waiting retrain covers the delete
        ann = session.get(Annotation, created.annotation_id)
        assert ann.deleted_at is not None and svc.active_annotations(session) == []
        assert (home.masks_dir / f"{ann.id}.png").exists()  # history stays
        # a late delivery of the deleted revision does not resurrect it; a newer revision does
        late = record_annotation(session, home, kind="defect_mask", mask=defect(), source_updated_at=T0, **kw)
        assert late.outcome == "unchanged" and session.get(Annotation, ann.id).deleted_at is not None
        back = record_annotation(session, home, kind="normal", source_updated_at=T0 + timedelta(hours=1), **kw)
        assert back.outcome == "updated" and session.get(Annotation, ann.id).deleted_at is None
        assert svc.delete_annotation(session, home, annotation_id=ann.id) is True
        assert counts(session)[0] == 1


def check_rejections_store_nothing(sf: sessionmaker[Session], home: Home, tmp_path: Path) -> None:  # noqa: F811
    with sf() as session:
        image = add_test_image(session, tmp_path, "g", width=W, height=H)
        session.commit()
        bad = [
            (dict(kind="defect_mask", mask=np.ones((H + 1, W), bool)), f"{W}x{H + 1} .*is {W}x{H}"),
            (dict(kind="defect_mask", mask=np.ones((W, H), bool)), "masks must match the image exactly"),
            (dict(kind="defect_mask", mask=np.zeros((H, W), bool)), "mask is empty"),
            (dict(kind="defect_mask", mask=np.ones((H, W, 3), np.uint8)), "2-D"),
            (dict(kind="defect_mask", mask=np.full((H, W), 0.7, np.float32)), "boolean or uint8"),
            (dict(kind="defect_mask", mask=np.arange(H * W).reshape(H, W).astype(np.uint8)), "0/1 or 0/255"),
            (dict(kind="defect_mask", mask=None), "needs a mask"),
            (dict(kind="normal", mask=defect()), "takes no mask"),
            (dict(kind="defect_no_mask", mask=defect()), "takes no mask"),
            (dict(kind="scratch", mask=None), "kind must be one of"),
        ]
        for kwargs, message in bad:
            with pytest.raises(AnnotationError, match=message):
                record_annotation(session, home, image=image.id, **kwargs)
        assert counts(session) == (0, 0) and mask_files(home) == []


def check_unknown_and_corrupt_images(sf: sessionmaker[Session], home: Home, tmp_path: Path) -> None:  # noqa: F811
    with sf() as session:
        image = add_test_image(session, tmp_path, "h", width=W, height=H)
        gone = add_test_image(session, tmp_path, "i", width=W, height=H)
        session.commit()
        for ref in (9999, "9999", str(tmp_path / "never-ingested.png"), "deadbeefdeadbeef"):
            with pytest.raises(AnnotationError, match="is not in the database; ingest it first with `dmad ingest`"):
                record_annotation(session, home, image=ref, kind="normal")
        Path(image.path).write_bytes(os.urandom(2000))  # the file in the database is now garbage
        with pytest.raises(AnnotationError, match="corrupt or unreadable image file"):
            record_annotation(session, home, image=image.id, kind="defect_mask", mask=defect())
        Path(gone.path).unlink()
        with pytest.raises(AnnotationError, match="no longer exists"):
            record_annotation(session, home, image=gone.id, kind="normal")
        assert counts(session) == (0, 0) and mask_files(home) == []
        assert isinstance(AnnotationError("x"), UserError)


CHECKS = [check_create_defect_mask, check_every_change_enqueues_one_coalesced_retrain,
          check_idempotent_and_reordered_deliveries, check_no_times_compares_content, check_cli_without_external_id,
          check_delete, check_rejections_store_nothing, check_unknown_and_corrupt_images]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_annotations_on_sqlite(check, sqlite_sf, home, tmp_path) -> None:  # noqa: F811
    check(sqlite_sf, home, tmp_path)


def test_find_image_by_id_path_and_hash(sqlite_sf, tmp_path, monkeypatch) -> None:  # noqa: F811
    with sqlite_sf() as session:
        image = add_test_image(session, tmp_path, "j")
        session.commit()
        assert find_image(session, image.id) is image
        assert find_image(session, str(image.id)) is image
        assert find_image(session, image.path) is image
        monkeypatch.chdir(Path(image.path).parent.parent)
        assert find_image(session, os.path.join(Path(image.path).parent.name, "j.png")) is image
        assert find_image(session, image.content_hash[:8]) is image
        assert find_image(session, image.content_hash.upper()) is image
        with pytest.raises(AnnotationError):
            find_image(session, image.content_hash[:7])  # too short to be a hash prefix


def test_failure_after_the_mask_was_written_leaves_nothing(sqlite_sf, home, tmp_path,  # noqa: F811
                                                           monkeypatch) -> None:
    with sqlite_sf() as session:
        image = add_test_image(session, tmp_path, "k", width=W, height=H)
        session.commit()
        kw = dict(image=image.id, source="labelstudio", external_id="1")
        first = record_annotation(session, home, kind="defect_mask", mask=defect(), source_updated_at=T0, **kw)

        def broken_enqueue(*args, **kwargs):
            raise RuntimeError("database went away")

        monkeypatch.setattr(svc, "enqueue", broken_enqueue)
        with pytest.raises(RuntimeError):  # an update: the previous mask file must come back
            record_annotation(session, home, kind="defect_mask", mask=defect(0, 0, 3),
                              source_updated_at=T0 + timedelta(hours=1), **kw)
        with pytest.raises(RuntimeError):  # a creation: no row and no file
            record_annotation(session, home, image=image.id, kind="defect_mask", mask=defect(), source="ui")
        ann = session.get(Annotation, first.annotation_id)
        assert ann.source_updated_at == T0
        np.testing.assert_array_equal(load_mask(ann, home), defect())
        assert mask_files(home) == [f"{first.annotation_id}.png"]
        assert counts(session) == (1, 1)


def test_enqueue_retrain_false_and_load_mask_errors(sqlite_sf, home, tmp_path) -> None:  # noqa: F811
    with sqlite_sf() as session:
        image = add_test_image(session, tmp_path, "l", width=W, height=H)
        session.commit()
        res = record_annotation(session, home, image=image, kind="normal", enqueue_retrain=False)
        assert res.job_id is None and counts(session) == (1, 0)
        with pytest.raises(AnnotationError, match="has no mask"):
            load_mask(session.get(Annotation, res.annotation_id), home)
        with pytest.raises(AnnotationError, match="say which annotation"):
            svc.delete_annotation(session, home, source="cli")


def test_active_annotations_load_their_images(sqlite_sf, home, tmp_path) -> None:  # noqa: F811
    with sqlite_sf() as session:
        image = add_test_image(session, tmp_path, "m", width=W, height=H)
        session.commit()
        record_annotation(session, home, image=image.id, kind="defect_no_mask")
    with sqlite_sf() as session:
        (ann,) = svc.active_annotations(session)
    assert isinstance(ann.image, Image) and ann.image.path == image.path  # usable after the session closed


def test_decisions_read_fresh_rows_not_the_sessions_stale_copy(sqlite_sf, home, tmp_path) -> None:  # noqa: F811
    with sqlite_sf() as webhook, sqlite_sf() as sync:
        image_id = add_test_image(webhook, tmp_path, "n", width=W, height=H).id
        webhook.commit()
        kw = dict(image=image_id, source="labelstudio", external_id="5")
        first = record_annotation(webhook, home, kind="normal", source_updated_at=T0, **kw)
        held = webhook.get(Annotation, first.annotation_id)  # the webhook's session holds a copy ...
        assert held is not None and held.source_updated_at == T0
        newer = record_annotation(sync, home, kind="defect_no_mask",
                                  source_updated_at=T0 + timedelta(minutes=10), **kw)
        assert newer.outcome == "updated"
        late = record_annotation(webhook, home, kind="normal", source_updated_at=T0 + timedelta(minutes=5), **kw)
        assert late.outcome == "unchanged"
        assert held.kind == "defect_no_mask"  # ... refreshed by the decision's read
