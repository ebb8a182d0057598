"""`dmad serve`'s HTTP API (FastAPI): score line images with the active version.

    POST /v1/score?category=C[&heatmap=png|rle]   an image as the raw body (Content-Type image/* or
                                                  application/octet-stream) or as multipart field ``file``
                                                  (``category`` may then be a form field too)
    GET  /v1/health                               liveness, the version served, the queue's depth
    GET  /v1/version                              the version served and each class's OK/NG threshold

Every route but health needs ``Authorization: Bearer <token>`` (the home's secret ``serve_token``).
Uploads are bounded before they are read whole (bytes) and before they are decoded (pixels): 413. A
request never names a path: the image store's file names come from content hashes. Typed errors become
statuses in one table (``dmad_core.errors.HTTP_STATUS``), a full queue 503 with Retry-After.

Laid out as FastAPI's full-stack template lays out an API: this factory builds the app and its lifespan;
the routes live in ``routes/`` (one module per resource, gathered in ``routes.api_router``), what they need
in ``deps.py`` (the running ``ServeState`` on ``app.state``, the version in force, the token check), the
bodies in ``models.py`` and the error answers in ``errors.py``.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from app.api import errors
from app.api.config import API_VERSION, TOKEN_SECRET, ServeConfig
from app.api.deps import ServeState
from app.api.routes import api_router
from app.home_folder import Home
from app.services.prediction import LineModel
from app.services.serving import ActiveLineModel, LineBatcher
from dmad_core.errors import Invalid

__all__ = ["API_VERSION", "TOKEN_SECRET", "ServeConfig", "create_app"]


def _feed_batches(state: ServeState) -> Callable[[Any, Any, Any], None] | None:
    """After answering, a batch joins the pool (``config.feed``)."""
    if not state.config.feed:
        return None
    from app.services.feed import feed

    def on_batch(model: LineModel, images: Any, results: Any) -> None:
        with state.sessions() as session:
            feed(session, state.home, model.version_id, images, results)

    return on_batch


def create_app(home: Home, sessions: sessionmaker[Session], config: ServeConfig = ServeConfig(),
               token: str | None = None, loader: Callable[..., LineModel] = LineModel.load) -> FastAPI:
    """The scoring service of ``home``. ``token`` (default: the home's ``serve_token`` secret) is what
    clients must send; the model is loaded when the app starts (its lifespan), not here, by ``loader``
    (``LineModel.load``; benchmarks/serve.py passes its kNN-baseline variant)."""
    expected = token or home.read_secret(TOKEN_SECRET)
    if not expected:
        raise Invalid(f"no API token: run `dmad serve` once to create {home.secrets_dir / TOKEN_SECRET}")
    state = ServeState(home, sessions, config, expected)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.holder = await run_in_threadpool(ActiveLineModel, home, sessions, loader)
        state.batcher = LineBatcher(config.max_batch, config.max_wait_ms / 1000, config.max_queue,
                                    _feed_batches(state)).start()
        stop = threading.Event()
        poller = threading.Thread(target=state.holder.poll, args=(stop, config.poll_s), name="version-poller",
                                  daemon=True)
        poller.start()
        try:
            yield
        finally:
            stop.set()
            state.batcher.stop()
            poller.join(timeout=10)

    app = FastAPI(title="DMAD line scoring", version=API_VERSION, lifespan=lifespan,
                  description="Scores product images with the active DMAD model version: score, OK/NG by "
                              "the class's threshold, top patches and heat map.")
    app.state.serve = state
    errors.install(app)
    app.include_router(api_router)
    return app
