"""The model version registry on a real SQLite file and a real models folder."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.home_folder import Home
from app.services.loop import versions
from app.services.loop.versions import VersionError
from db.models import ModelVersion
from tests.db_fixtures import home, sqlite_engine, sqlite_sf, sqlite_url  # noqa: F401

TRAINED_ON = {"categories": {"bottle": {"normal_images": 3, "defect_masks": 1, "confirmed_normals": 0,
                                        "weak_defects": 0}}, "annotation_ids": [1]}


def make_version(session: Session, home: Home, status: str = "candidate",  # noqa: F811
                 parent_id: int | None = None) -> ModelVersion:
    name, tmp = versions.new_version_dir(home, session)
    (tmp / "bank").mkdir()
    (tmp / "bank" / "normal.npy").write_bytes(b"\x00" * 128)
    (tmp / "config.json").write_text("{}")
    return versions.commit_version(session, home, name, tmp, {"preset": "offline"}, parent_id, TRAINED_ON,
                                   status=status)


def statuses(session: Session) -> dict[str, str]:
    session.expire_all()
    return {v.name: v.status for v in versions.list_versions(session)}


def check_promote_and_rollback(sf: sessionmaker[Session], home: Home) -> None:  # noqa: F811
    with sf() as session:
        v1 = make_version(session, home, status="active")
        v2 = make_version(session, home, parent_id=v1.id)
        v3 = make_version(session, home, parent_id=v2.id)
        assert statuses(session) == {"v0001": "active", "v0002": "candidate", "v0003": "candidate"}
        versions.promote(session, v2.id)
        versions.promote(session, v3.id)
        assert statuses(session) == {"v0001": "retired", "v0002": "retired", "v0003": "active"}
        assert versions.active_version(session).name == "v0003"

        assert versions.rollback(session).name == "v0002"
        assert statuses(session) == {"v0001": "retired", "v0002": "active", "v0003": "retired"}
        assert versions.rollback(session).name == "v0001"  # further back, never forth to v0003
        with pytest.raises(VersionError, match="nothing to roll back to"):
            versions.rollback(session)
        assert versions.active_version(session).name == "v0001"

        versions.promote(session, v2.id)  # a new activation: rollback returns to what was active before
        assert versions.rollback(session).name == "v0001"
        versions.promote(session, v3.id)  # explicitly promoting a rolled-back version is allowed
        assert versions.active_version(session).name == "v0003"
        assert versions.rollback(session).name == "v0001"

        versions.promote(session, v1.id)  # promoting the active one is a no-op
        assert versions.active_version(session).name == "v0001"
        assert session.get(ModelVersion, v3.id).parent_id == v2.id


def check_promote_is_one_transaction(sf: sessionmaker[Session], home: Home) -> None:  # noqa: F811
    with sf() as session:
        v1_id = make_version(session, home, status="active").id
        v2 = make_version(session, home)

        def refuse_activation(sess, _ctx, _instances):
            if any(isinstance(o, ModelVersion) and o.status == "active" for o in sess.dirty):
                raise RuntimeError("disk full")

        event.listen(session, "before_flush", refuse_activation)
        with pytest.raises(RuntimeError, match="disk full"):
            versions.promote(session, v2.id)  # fails after the old version was already retired
        event.remove(session, "before_flush", refuse_activation)
    with sf() as session:  # nothing of the half-done promotion was stored
        assert statuses(session) == {"v0001": "active", "v0002": "candidate"}
        assert session.get(ModelVersion, v1_id).activated_at is not None


def check_second_active_row_refused(sf: sessionmaker[Session], home: Home) -> None:  # noqa: F811
    with sf() as session:
        make_version(session, home, status="active")
        v2 = make_version(session, home)
        v2.status = "active"  # bypassing promote(): the database refuses
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        assert statuses(session) == {"v0001": "active", "v0002": "candidate"}


CHECKS = [check_promote_and_rollback, check_promote_is_one_transaction, check_second_active_row_refused]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_versions_on_sqlite(check, sqlite_sf, home) -> None:  # noqa: F811
    check(sqlite_sf, home)


def test_new_version_dir_allocates_names_and_temp_folders(sqlite_sf, home) -> None:  # noqa: F811
    name1, tmp1 = versions.new_version_dir(home)
    name2, tmp2 = versions.new_version_dir(home)  # the first temp folder holds its name
    assert (name1, name2) == ("v0001", "v0002")
    assert tmp1.parent == home.models_dir and tmp1.name.startswith(".tmp-v0001-") and tmp1.is_dir()
    with sqlite_sf() as session:
        assert versions.list_versions(session) == [] and versions.active_version(session) is None
        (tmp2 / "weights.pt").write_bytes(b"w" * 10)
        v = versions.commit_version(session, home, name2, tmp2, {"k": 1}, None, TRAINED_ON)
        assert not tmp2.exists()
        assert Path(v.folder) == home.models_dir / "v0002"
        assert (home.models_dir / "v0002" / "weights.pt").read_bytes() == b"w" * 10
        assert (v.status, v.config, v.trained_on) == ("candidate", {"k": 1}, TRAINED_ON)
        assert [x.name for x in versions.list_versions(session)] == ["v0002"]  # the temp folder is no version
        assert versions.new_version_dir(home, session)[0] == "v0003"


def test_commit_version_without_a_row_leaves_no_published_folder(sqlite_sf, home) -> None:  # noqa: F811
    with sqlite_sf() as session:
        v1 = make_version(session, home)
        os.rename(v1.folder, home.models_dir / "moved-away")  # folder gone, row kept: name still taken
        name, tmp = versions.new_version_dir(home)  # without the session it cannot see the row
        assert name == "v0001"
        with pytest.raises(IntegrityError):
            versions.commit_version(session, home, name, tmp, {}, None, {})
        assert tmp.is_dir() and not (home.models_dir / "v0001").exists()  # back under its temp name
        assert [v.name for v in versions.list_versions(session)] == ["v0001"]


def test_commit_version_refuses_an_existing_folder(sqlite_sf, home) -> None:  # noqa: F811
    name, tmp = versions.new_version_dir(home)
    (home.models_dir / name).mkdir()
    with sqlite_sf() as session, pytest.raises(VersionError, match="already exists"):
        versions.commit_version(session, home, name, tmp, {}, None, {})


def test_promote_refuses_failed_and_unknown_versions(sqlite_sf, home) -> None:  # noqa: F811
    with sqlite_sf() as session:
        bad = make_version(session, home, status="failed")
        with pytest.raises(VersionError, match="failed"):
            versions.promote(session, bad.id)
        with pytest.raises(VersionError, match="does not exist"):
            versions.promote(session, 4242)
        with pytest.raises(VersionError, match="no active model version"):
            versions.rollback(session)
        assert versions.get_version(session, "v0001").id == bad.id


def test_cleanup_orphans(sqlite_sf, home) -> None:  # noqa: F811
    with sqlite_sf() as session:
        kept = make_version(session, home)
        _, stale_tmp = versions.new_version_dir(home, session)
        _, young_tmp = versions.new_version_dir(home, session)
        old = time.time() - 2 * 3600
        os.utime(stale_tmp, (old, old))
        (home.models_dir / "v0099").mkdir()  # a folder nobody registered
        gone = make_version(session, home)
        shutil.rmtree(gone.folder)

        report = versions.cleanup_orphans(session, home)
        assert report.removed_tmp == [stale_tmp] and not stale_tmp.exists()
        assert report.kept_tmp == [young_tmp] and young_tmp.exists()
        assert report.folders_without_rows == [home.models_dir / "v0099"]
        assert (home.models_dir / "v0099").exists()  # reported, not deleted
        assert report.rows_without_folders == [gone.name]
        assert Path(kept.folder).is_dir()
