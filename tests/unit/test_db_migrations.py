"""Migrations: up to head, down to base, up again; and the head migration matches the models."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from alembic import command

from db.engine import _run_alembic, alembic_config, current_revision, downgrade, make_engine, upgrade_to_head
from db.models import Base

APP_TABLES = {"categories", "images", "annotations", "model_versions", "jobs", "metrics", "pool_scores",
              "label_tasks", "threshold_overrides"}


def head_revision(url: str) -> str:
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert head is not None
    return head


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def check_up_down_up(url: str) -> None:
    """Shared with the PostgreSQL tests."""
    assert current_revision(url) is None
    upgrade_to_head(url)
    assert current_revision(url) == head_revision(url)
    assert APP_TABLES <= table_names(url)

    upgrade_to_head(url)  # the app runs it at every start: a no-op at head
    assert current_revision(url) == head_revision(url)

    downgrade(url, "base")
    assert current_revision(url) is None
    assert not (APP_TABLES & table_names(url))

    upgrade_to_head(url)
    assert current_revision(url) == head_revision(url)
    assert APP_TABLES <= table_names(url)


def check_job_result_moves_to_its_column_and_back(url: str) -> None:
    """Shared with the PostgreSQL tests: 0005 moves an upload's result out of the job's payload into the
    `result` column, and its downgrade puts it back, so neither direction loses one."""
    _run_alembic(url, command.upgrade, "0004")
    engine = make_engine(url)
    jobs = sa.table("jobs", sa.column("id", sa.Integer()), sa.column("payload", sa.JSON()),
                    sa.column("result", sa.JSON()))
    old = {"path": "/u/a.png", "category": "tiles", "result": {"score": 1.5, "version": "v0002"}}
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO jobs (type, status, attempts, max_attempts, lease_expiries, progress, "
                                 "message, payload, created_at, priority) VALUES ('score_upload', 'succeeded', 1, 3, "
                                 "0, 1.0, '', :payload, :created, 0)")
                         .bindparams(sa.bindparam("payload", type_=sa.JSON()),
                                     sa.bindparam("created", type_=sa.DateTime(timezone=True))),
                         {"payload": old, "created": datetime(2026, 12, 7, tzinfo=UTC)})
        upgrade_to_head(url)
        with engine.connect() as conn:
            payload, result = conn.execute(sa.select(jobs.c.payload, jobs.c.result)).one()
        assert (payload, result) == ({"path": "/u/a.png", "category": "tiles"}, {"score": 1.5, "version": "v0002"})
        downgrade(url, "0004")
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT payload FROM jobs").columns(sa.column("payload", sa.JSON()))).scalar() == old
    finally:
        engine.dispose()


def test_job_result_moves_to_its_column_and_back(tmp_path: Path) -> None:
    check_job_result_moves_to_its_column_and_back(f"sqlite:///{tmp_path / 'dmad.db'}")


def schema_diff(url: str, metadata: sa.MetaData) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    finally:
        engine.dispose()


def test_sqlite_up_down_up(tmp_path: Path) -> None:
    check_up_down_up(f"sqlite:///{tmp_path / 'dmad.db'}")


def test_head_migration_matches_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dmad.db'}"
    upgrade_to_head(url)
    assert schema_diff(url, Base.metadata) == []


def test_comparison_would_notice_a_difference(tmp_path: Path) -> None:
    """Guards the test above against passing vacuously."""
    url = f"sqlite:///{tmp_path / 'dmad.db'}"
    upgrade_to_head(url)
    changed = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["jobs"].append_column(sa.Column("extra", sa.Integer()))
    sa.Index("ix_extra_on_jobs", changed.tables["jobs"].c.type)
    diff = schema_diff(url, changed)
    kinds = {d[0] if isinstance(d, tuple) else d[0][0] for d in diff}
    assert {"add_column", "add_index"} <= kinds


def test_partial_unique_indexes_exist_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dmad.db'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            sql = dict(conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'index'").all())
    finally:
        engine.dispose()
    assert "WHERE status = 'active'" in sql["uq_model_versions_one_active"]
    assert "WHERE status = 'queued'" in sql["uq_jobs_queued_coalesce_key"]


def test_upgrade_creates_the_sqlite_file_folder(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'home' / 'dmad.db'}"
    upgrade_to_head(url)
    assert (tmp_path / "new" / "home" / "dmad.db").exists()


def test_no_alembic_ini_needed_in_working_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # an empty folder: nothing to find here
    upgrade_to_head(f"sqlite:///{tmp_path / 'dmad.db'}")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("dmad.db")) == []
