"""Opening a home's database: one place that knows where it is, that it must exist, and that it is
upgraded to the newest schema before anything reads it."""

from __future__ import annotations

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.home_folder import Home
from db.engine import cached_engine, session_factory, upgrade_to_head
from dmad_core.errors import NotFound, Unavailable


def has_database(home: Home) -> bool:
    return home.load_settings().db_url is not None or home.db_path.exists()


def open_database(home: Home, create: bool = False) -> sessionmaker[Session]:
    """A session factory on the home's database at the newest schema; a clear error when the home
    was never initialised (unless `create`, which `dmad init` passes) or the database does not answer."""
    if not create and not has_database(home):
        raise NotFound(f"no database in {home.root}; create the home with `dmad init --home {home.root}`")
    url = home.db_url()
    try:
        upgrade_to_head(url)
    except OperationalError as exc:
        raise Unavailable(f"cannot open the database {redact_url(url)}: {exc.orig}") from exc
    return session_factory(cached_engine(url))


def redact_url(url: str) -> str:
    """A database URL without its password, fit for logs and error messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a malformed URL is shown as the user typed it, minus nothing secret
        return url.split("@")[-1]
