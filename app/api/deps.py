"""The scoring API's dependencies (FastAPI ``Depends``), as the full-stack template's ``api/deps.py``:
what a route needs is declared in its signature, never captured from the factory's closure.

- ``StateDep``: the running service (``ServeState``: the model holder, the batcher, the config), set on
  ``app.state`` by the app's lifespan;
- ``LineDep``: the version in force when the request arrives (a promotion never changes a request half-way);
- ``authorised``: the bearer token check (a router's or a route's dependency).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from app.api.config import ServeConfig
from app.home_folder import Home
from app.services.inference import Inferencer
from app.services.serving import ActiveLineModel, LineBatcher


@dataclass
class ServeState:
    """What the service holds while it runs (one per app)."""

    home: Home
    sessions: sessionmaker[Session]
    config: ServeConfig
    token: str  # what clients must send as the bearer token
    holder: ActiveLineModel | None = None  # set by the lifespan
    batcher: LineBatcher | None = None  # set by the lifespan


class Unauthorised(Exception):
    """No or a wrong bearer token (answered 401 by ``errors.install``)."""


def get_state(request: Request) -> ServeState:
    return request.app.state.serve


StateDep = Annotated[ServeState, Depends(get_state)]


def current_line(state: StateDep) -> Inferencer:
    """The version in force now: the request is scored by it to the end."""
    return state.holder.current


LineDep = Annotated[Inferencer, Depends(current_line)]

bearer = HTTPBearer(auto_error=False, description="the home's serve_token secret")


def authorised(state: StateDep, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    """Pass with the home's token; ``Unauthorised`` otherwise (compared in constant time)."""
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), state.token.encode()):
        raise Unauthorised()
