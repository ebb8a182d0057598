"""What every page needs from Streamlit: the home folder, a session factory, cached crops, and the
empty states that tell the user which command comes next.

The home comes from `$DMAD_HOME` (default ./dmad-home). Engines and session factories are process-wide
resources (`st.cache_resource`); everything else a page reads comes fresh from the database.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import streamlit as st
from sqlalchemy.orm import Session, sessionmaker

from app.home_folder import Home
from app.services.database import has_database
from app.services import imaging
from dmad_core.errors import Conflict, Invalid, NotFound, Unavailable, UserError

if TYPE_CHECKING:
    from annotation.server import ServerStatus

HOME_ENV = "DMAD_HOME"

NO_DATA = "No data yet: run `dmad ingest DIR` to add images of a product class."
NO_MODEL = "No model yet: run `dmad train` to train the first (unsupervised) version."
NO_LABEL_STUDIO = "Label Studio is not running: start it with `dmad labelstudio start`."
# Label Studio's state in a few words, the same on every page (ServerStatus.state says which)
LABEL_STUDIO_BRIEF = {"running": "running", "starting": "starting (about a minute the first time)",
                      "not answering": "not answering", "not running": "not running (`dmad labelstudio start`)"}

# The UI's edge of the error types (dmad_core/errors.py): what is missing is a warning (the page goes
# on without it); everything else the user must act on is an error.
STREAMLIT_LEVEL: dict[type[UserError], str] = {NotFound: "warning", Invalid: "error", Conflict: "error",
                                               Unavailable: "error", UserError: "error"}


def error_level(exc: UserError) -> str:
    """"warning" or "error": the Streamlit call that shows this error (the most specific type wins)."""
    return next(level for kind, level in STREAMLIT_LEVEL.items() if isinstance(exc, kind))


def show_error(exc: UserError, prefix: str = "") -> None:
    """Shows an error the user can fix, at the level its type calls for."""
    getattr(st, error_level(exc))(prefix + str(exc))


def page(title: str, icon: str = "🔍") -> None:
    """Page settings; must be the page's first Streamlit call."""
    st.set_page_config(page_title=f"{title} · DMAD", page_icon=icon, layout="wide")


def current_home() -> Home:
    return Home.at(os.environ.get(HOME_ENV) or None)


@st.cache_resource(show_spinner=False)
def _sessions(url: str) -> sessionmaker[Session]:
    """One session factory per database, with the schema brought to head once per process (the app
    upgrades at start, as the workers do)."""
    from db.engine import cached_engine, session_factory, upgrade_to_head

    upgrade_to_head(url)
    return session_factory(cached_engine(url))


def open_home() -> tuple[Home, sessionmaker[Session]]:
    """The home and its sessions; a page without a database explains how to make one and stops."""
    home = current_home()
    if not has_database(home):
        st.info(f"No database in `{home.root}` yet: run `dmad init --home {home.root}`, then "
                f"`dmad ingest DIR` to add images. (The UI reads the home named by ${HOME_ENV}.)")
        st.stop()
    return home, _sessions(home.db_url())


@st.cache_data(ttl=5, show_spinner=False)
def labelstudio_status(home_root: str) -> ServerStatus:
    """Is the home's Label Studio running and answering? Cached a few seconds: it is an HTTP call."""
    from app.services.labelstudio.home import label_studio_server

    return label_studio_server(Home.at(home_root)).status()


@st.cache_data(max_entries=2000, show_spinner=False)
def crop_jpeg(path: str, box: tuple[int, int, int, int], patch_map: bytes, map_shape: tuple[int, int],
              lo: float, hi: float, opacity: float = 0.5, size: int = 192) -> bytes | None:
    """A Review crop with its heat map as JPEG bytes, keyed by image path and box (and the map and
    colour scale that tint it); None when the image file cannot be read."""
    try:
        rgb = imaging.load_rgb(path)
    except OSError:
        return None
    grid = np.frombuffer(patch_map, dtype=np.float16).reshape(map_shape)
    return imaging.to_jpeg(imaging.thumbnail(rgb, grid, box, lo, hi, opacity, size))


def inspect_link(image_id: int, label: str = "Inspect") -> str:
    """A markdown link to the Inspect page of one image (a relative URL, so it works under any base
    path and from any page)."""
    return f"[{label}](Inspect?image_id={int(image_id)})"
