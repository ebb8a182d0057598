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

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from app.api import errors
from app.api.config import API_VERSION, ServeConfig
from app.api.deps import ServeState
from app.api.metrics import instrument
from app.api.routes import api_router
from app.home_folder import Home
from app.services.read.metrics import ServeMetrics
from app.services.line.prediction import LineModel
from app.services.line.serving import ActiveLineModel, LineBatcher
from app.services.line.spool import SpooledFeed
from app.services.line.tokens import TOKEN_SECRET, ServeTokens
from dmad_core.errors import Invalid

__all__ = ["API_VERSION", "TOKEN_SECRET", "ServeConfig", "create_app"]


def create_app(home: Home, sessions: sessionmaker[Session], config: ServeConfig = ServeConfig(),
               token: str | None = None, loader: Callable[..., LineModel] = LineModel.load) -> FastAPI:
    """The scoring service of ``home``. ``token`` (default: the home's ``serve_token`` secret) is what
    clients must send; the model is loaded when the app starts (its lifespan), not here, by ``loader``
    (``LineModel.load``; benchmarks/serve.py passes its kNN-baseline variant)."""
    tokens = ServeTokens(home, token)  # the home's token is re-read when `dmad token rotate` replaces it
    if not tokens.configured:
        raise Invalid(f"no API token: run `dmad serve` once to create {home.secrets_dir / TOKEN_SECRET}")
    state = ServeState(home, sessions, config, tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.holder = await run_in_threadpool(ActiveLineModel, home, sessions, loader)
        state.batcher = LineBatcher(config.max_batch, config.max_wait_ms / 1000, config.max_queue,
                                    keep=spooled.keep if spooled else None).start()
        stop = threading.Event()
        poller = threading.Thread(target=state.holder.poll, args=(stop, config.poll_s), name="version-poller",
                                  daemon=True)
        poller.start()
        if spooled:  # what a killed serve or a database outage left is fed once the database answers
            await run_in_threadpool(spooled.spool.ensure_reserve)
            threading.Thread(target=spooled.run_replayer, args=(stop, config.poll_s), name="spool-replayer",
                             daemon=True).start()
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
    metrics = app.state.metrics = ServeMetrics()
    # the feed goes through a spool on the home's disk: an image answered 200 survives the database away
    spooled = SpooledFeed(home, sessions, metrics.feed_failures.inc, metrics.spool_replayed.inc) if config.feed else None
    metrics.watch(lambda: state.batcher.depth if state.batcher is not None else 0,
                  lambda: (state.running()[0].current.version, state.running()[0].current.version_id),
                  spooled.spool.count_images if spooled else None, spooled.spool.reserve_held if spooled else None)
    instrument(app, metrics)
    errors.install(app)
    app.include_router(api_router)
    return app
