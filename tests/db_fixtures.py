"""Fixtures for the database tests: SQLite files in tmp_path, and fresh PostgreSQL databases.

Import the fixtures you use into a test module (`from tests.db_fixtures import sqlite_url, ...`).
PostgreSQL tests skip, with the reason, when the server at $DMAD_TEST_POSTGRES_URL is unreachable.
Every PostgreSQL test gets its own database `dmad_test_<random>`, dropped afterwards, because runs
of the suite share the server.
"""

from __future__ import annotations

import os
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.home_folder import Home
from db.engine import make_engine, session_factory, upgrade_to_head
from db.models import Image
from db.repositories import add_image

PG_URL_ENV = "DMAD_TEST_POSTGRES_URL"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def write_png(path: Path, width: int = 32, height: int = 24, seed: int = 0) -> Path:
    """A random RGB PNG (distinct seeds give distinct content hashes)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def add_test_image(session: Session, tmp_path: Path, name: str = "img", category: str = "bottle",
                   role: str = "pool", width: int = 32, height: int = 24, seed: int | None = None) -> Image:
    seed = seed if seed is not None else zlib.crc32(f"{category}/{name}".encode())
    path = write_png(tmp_path / "images" / category / f"{name}.png", width, height, seed)
    return add_image(session, category, path, role)  # type: ignore[arg-type]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file upgraded to head."""
    url = f"sqlite:///{tmp_path / 'dmad.db'}"
    upgrade_to_head(url)
    return url


def _engine_fixture(url: str) -> Iterator[Engine]:
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    yield from _engine_fixture(sqlite_url)


@pytest.fixture
def sqlite_sf(sqlite_engine: Engine) -> sessionmaker[Session]:
    return session_factory(sqlite_engine)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    h = Home.at(tmp_path / "home")
    h.create()
    return h


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """The PostgreSQL server's URL (its maintenance database), or skip."""
    url = os.environ.get(PG_URL_ENV, DEFAULT_PG_URL)
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure to connect means: no server for these tests
        pytest.skip(f"PostgreSQL not reachable at {make_url(url).render_as_string(hide_password=True)} "
                    f"(set {PG_URL_ENV}): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    finally:
        engine.dispose()
    return url


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"dmad_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(pg_server_url).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    upgrade_to_head(pg_url)
    yield from _engine_fixture(pg_url)


@pytest.fixture
def pg_sf(pg_engine: Engine) -> sessionmaker[Session]:
    return session_factory(pg_engine)


__all__ = ["add_test_image", "home", "pg_engine", "pg_server_url", "pg_sf", "pg_url",
           "sqlite_engine", "sqlite_sf", "sqlite_url", "write_png"]
