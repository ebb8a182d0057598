"""The models on a real SQLite file: constraints the database itself enforces, and round trips."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from db.models import Annotation, Category, Image, Job, ModelVersion, PoolScore
from tests.db_fixtures import sqlite_engine, sqlite_sf, sqlite_url  # noqa: F401


def _category_and_image(session: Session) -> tuple[Category, Image]:
    category = Category(name="bottle")
    image = Image(category=category, content_hash="a" * 64, path="/x/1.png", role="pool", width=4, height=3)
    session.add_all([category, image])
    session.flush()
    return category, image


def _version(name: str, status: str = "candidate") -> ModelVersion:
    return ModelVersion(name=name, folder=f"/models/{name}", config={}, status=status, trained_on={})


def check_single_active_version(sf: sessionmaker[Session]) -> None:
    with sf() as session:
        session.add_all([_version("v0001", "active"), _version("v0002", "retired"), _version("v0003")])
        session.commit()
        session.add(_version("v0004", "active"))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        session.add_all([_version("v0005", "retired"), _version("v0006", "retired")])  # many non-active: fine
        session.commit()
        assert session.scalars(select(ModelVersion.name).where(ModelVersion.status == "active")).all() == ["v0001"]


def check_utc_datetimes(sf: sessionmaker[Session]) -> None:
    plus2 = timezone(timedelta(hours=2))
    with sf() as session:
        category, image = _category_and_image(session)
        a = Annotation(image_id=image.id, kind="normal", source="t", external_id="1",
                       source_updated_at=datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=plus2))
        b = Annotation(image_id=image.id, kind="normal", source="t", external_id="2",
                       source_updated_at=datetime(2024, 5, 1, 10, 0, 0))  # naive: taken as UTC
        session.add_all([a, b])
        session.commit()
        ids = a.id, b.id
    with sf() as session:
        a, b = (session.get(Annotation, i) for i in ids)
        assert a.source_updated_at == datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)
        assert a.source_updated_at.tzinfo is not None and a.source_updated_at.utcoffset() == timedelta(0)
        assert b.source_updated_at == datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)
        assert a.created_at.tzinfo is not None
        assert abs(datetime.now(UTC) - a.created_at) < timedelta(minutes=1)
        # comparisons in SQL agree with Python's
        later = session.scalars(select(Annotation.id).where(
            Annotation.source_updated_at > datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC))).all()
        assert later == [a.id]


def check_external_id_unique_but_nulls_free(sf: sessionmaker[Session]) -> None:
    with sf() as session:
        _, image = _category_and_image(session)
        session.add_all([Annotation(image_id=image.id, kind="normal", source="cli") for _ in range(3)])
        session.add(Annotation(image_id=image.id, kind="normal", source="labelstudio", external_id="7"))
        session.add(Annotation(image_id=image.id, kind="normal", source="ui", external_id="7"))
        session.commit()
        session.add(Annotation(image_id=image.id, kind="normal", source="labelstudio", external_id="7"))
        with pytest.raises(IntegrityError):
            session.commit()


def check_enums_enforced(sf: sessionmaker[Session]) -> None:
    with sf() as session:
        _category_and_image(session)
        session.commit()
        session.add(Image(category_id=1, content_hash="b" * 64, path="/x/2.png", role="nonsense", width=1, height=1))
        with pytest.raises(StatementError):  # refused before it reaches the database
            session.flush()
        session.rollback()
        with pytest.raises(IntegrityError):  # and the database's CHECK constraint refuses raw SQL
            session.execute(text("INSERT INTO jobs (type, status, attempts, max_attempts, lease_expiries, progress, "
                                 "message, payload, created_at) VALUES ('x', 'zombie', 0, 3, 0, 0, '', '{}', "
                                 "CURRENT_TIMESTAMP)"))
        session.rollback()


def check_one_queued_job_per_coalesce_key(sf: sessionmaker[Session]) -> None:
    with sf() as session:
        session.add_all([Job(type="retrain", status="running", coalesce_key="retrain"),
                         Job(type="retrain", status="queued", coalesce_key="retrain"),
                         Job(type="score_pool", status="queued"), Job(type="score_pool", status="queued")])
        session.commit()
        session.add(Job(type="retrain", status="queued", coalesce_key="retrain"))
        with pytest.raises(IntegrityError):
            session.commit()


def check_json_and_patch_map_round_trip(sf: sessionmaker[Session]) -> None:
    grid = np.linspace(0, 3, 12, dtype=np.float32).reshape(3, 4)
    with sf() as session:
        _, image = _category_and_image(session)
        version = _version("v0001")
        version.config = {"backbone": "efficientnet_lite0", "layers": [2, 3], "nested": {"a": 1.5}}
        session.add(version)
        session.flush()
        session.add(PoolScore(version_id=version.id, image_id=image.id, score=2.5,
                              top_patches=[{"box": [0, 0, 8, 8], "score": 2.5}],
                              patch_map=grid.astype(np.float16).tobytes(), map_shape=[3, 4]))
        session.commit()
    with sf() as session:
        ps = session.scalars(select(PoolScore)).one()
        assert ps.top_patches == [{"box": [0, 0, 8, 8], "score": 2.5}]
        np.testing.assert_allclose(ps.patch_map_array(), grid, atol=1e-2)
        assert ps.patch_map_array().dtype == np.float16
        assert session.scalars(select(ModelVersion)).one().config["nested"] == {"a": 1.5}


def check_foreign_keys_enforced(sf: sessionmaker[Session]) -> None:
    with sf() as session:
        session.add(Annotation(image_id=12345, kind="normal", source="cli"))
        with pytest.raises(IntegrityError):
            session.commit()


CHECKS = [check_single_active_version, check_utc_datetimes, check_external_id_unique_but_nulls_free,
          check_enums_enforced, check_one_queued_job_per_coalesce_key, check_json_and_patch_map_round_trip,
          check_foreign_keys_enforced]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_models_on_sqlite(check, sqlite_sf: sessionmaker[Session]) -> None:  # noqa: F811
    check(sqlite_sf)


def test_sqlite_pragmas(sqlite_engine) -> None:  # noqa: F811
    with sqlite_engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_savepoint_rollback_keeps_outer_work_on_sqlite(sqlite_sf) -> None:  # noqa: F811
    """SAVEPOINTs need SQLAlchemy to issue BEGIN itself on SQLite; the engine is set up for it."""
    with sqlite_sf() as session:
        session.add(Category(name="kept"))
        session.flush()
        with pytest.raises(IntegrityError):
            with session.begin_nested():
                session.add(Category(name="kept"))
        session.add(Category(name="also kept"))
        session.commit()
        assert sorted(session.scalars(select(Category.name))) == ["also kept", "kept"]
