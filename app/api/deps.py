"""The scoring API's dependencies (FastAPI ``Depends``), as the full-stack template's ``api/deps.py``:
what a route needs is declared in its signature, never captured from the factory's closure.

- ``StateDep``: the running service (``ServeState``: the model holder, the batcher, the config), set on
  ``app.state`` by the app's lifespan;
- ``LineDep``: the version in force when the request arrives (a promotion never changes a request half-way);
- ``authorised``: the bearer token check (a router's or a route's dependency).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from app.api.config import ServeConfig
from app.home_folder import Home
from app.services.line.prediction import LineModel
from app.services.line.serving import ActiveLineModel, LineBatcher
from app.services.line.tokens import ServeTokens


@dataclass
class ServeState:
    """What the service holds while it runs (one per app)."""

    home: Home
    sessions: sessionmaker[Session]
    config: ServeConfig
    tokens: ServeTokens  # what clients must send as the bearer token (re-read after `dmad token rotate`)
    holder: ActiveLineModel | None = None  # set by the lifespan
    batcher: LineBatcher | None = None  # set by the lifespan

    def running(self) -> tuple[ActiveLineModel, LineBatcher]:
        """(the model holder, the batcher); RuntimeError before the lifespan started them."""
        if self.holder is None or self.batcher is None:
            raise RuntimeError("the scoring service has not started (its lifespan did not run)")
        return self.holder, self.batcher


class Unauthorised(Exception):
    """No or a wrong bearer token (answered 401 by ``errors.install``)."""


def get_state(request: Request) -> ServeState:
    return request.app.state.serve


StateDep = Annotated[ServeState, Depends(get_state)]


def current_line(state: StateDep) -> LineModel:
    """The version in force now: the request is scored by it to the end."""
    return state.running()[0].current


LineDep = Annotated[LineModel, Depends(current_line)]

bearer = HTTPBearer(auto_error=False, description="the home's serve_token secret")


def authorised(state: StateDep, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    """Pass with the home's token; ``Unauthorised`` otherwise (compared in constant time)."""
    if credentials is None or not state.tokens.accepts(credentials.credentials):
        raise Unauthorised()
