"""Engines, sessions and schema upgrades.

SQLite gets WAL (readers never block the writer), foreign keys, a busy timeout, and transactions that
SQLAlchemy begins itself, so that SAVEPOINTs work and a writer can take the write lock up front with
`BEGIN IMMEDIATE` (see `begin_write`): a deferred transaction that reads and then writes fails at once
with "database is locked" when another connection wrote in between, instead of waiting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

SQLITE_BUSY_TIMEOUT_MS = 30_000
# What a call raises when the database server is away (stopped, restarting, unreachable): the callers that
# must outlive an outage (the worker's loop, serve's feed, the webhook) catch these and try again later.
DATABASE_AWAY = (OperationalError, InterfaceError)
_BEGIN_OPTION = "dmad_sqlite_begin"  # connection execution option read by the SQLite "begin" hook


def make_engine(url: str, *, foreign_keys: bool = True, **kwargs: Any) -> Engine:
    """A new engine for `url`. `foreign_keys=False` exists for migrations only: SQLite batch mode
    copies and drops tables, which with foreign keys on would cascade deletes into child tables."""
    sa_url = make_url(url)
    if sa_url.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(sa_url, **kwargs)

    if sa_url.database and sa_url.database != ":memory:":
        Path(sa_url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(sa_url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver must not emit BEGIN; the hook below does
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


@lru_cache(maxsize=16)
def cached_engine(url: str) -> Engine:
    """One engine (and pool) per URL for the life of the process, created on first use."""
    return make_engine(url)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (the UI and workers pass them around)."""
    return sessionmaker(engine, expire_on_commit=False)


def begin_write(session: Session) -> None:
    """Start the session's next transaction as a writer.

    Any transaction already open on the session is committed first: a service owns its transaction,
    so pass it a plain session, not one inside a `with session.begin():` block.
    On SQLite the new one begins IMMEDIATE, taking the single write lock now (waiting up to the busy
    timeout) so that its later writes cannot fail on a stale read snapshot; elsewhere it is a plain begin.
    """
    if session.in_transaction():
        session.commit()
    bind = session.get_bind()
    if bind.dialect.name == "sqlite":
        session.connection(execution_options={_BEGIN_OPTION: "IMMEDIATE"})


@contextmanager
def write_transaction(session: Session) -> Iterator[Session]:
    """One write transaction on ``session``: begun as a writer (:func:`begin_write`), committed when the
    block ends, rolled back when anything (even KeyboardInterrupt) escapes it.

    Example::

        with sessions() as session, write_transaction(session):
            session.add(row)
    """
    begin_write(session)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise


def alembic_config(url: str) -> Config:
    """An Alembic configuration built in code: no alembic.ini needed in the working directory."""
    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).resolve().parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _run_alembic(url: str, fn: Any, revision: str) -> None:
    engine = make_engine(url, foreign_keys=False, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = connection
            fn(cfg, revision)
            connection.commit()
    finally:
        engine.dispose()


def upgrade_to_head(url: str) -> None:
    """Bring the schema at `url` to the newest revision (the app calls this at start)."""
    _run_alembic(url, command.upgrade, "head")


def downgrade(url: str, revision: str) -> None:
    """Take the schema at `url` down to `revision` ('base' drops everything)."""
    _run_alembic(url, command.downgrade, revision)


def current_revision(url: str) -> str | None:
    """The revision the database at `url` is at (None before the first upgrade)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
