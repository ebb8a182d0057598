"""`dmad serve`'s HTTP API (FastAPI): score line images with the active version.

    POST /v1/score?category=C[&heatmap=png|rle]   an image as the raw body (Content-Type image/* or
                                                  application/octet-stream) or as multipart field ``file``
                                                  (``category`` may then be a form field too)
    GET  /v1/health                               liveness, the version served, the queue's depth
    GET  /v1/version                              the version served and each class's OK/NG threshold

Every route but health needs ``Authorization: Bearer <token>`` (the home's secret ``serve_token``).
Uploads are bounded before they are read whole (bytes) and before they are decoded (pixels): 413. A
request never names a path: the image store's file names come from content hashes. Typed errors become
statuses in one table (``annotation.webhook.HTTP_STATUS``), a full queue 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import PIL.Image
from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session, sessionmaker

from annotation.webhook import http_status
from app.api.metrics import instrument
from app.home_folder import Home
from app.services.metrics import ServeMetrics
from app.services.prediction import MAX_PIXELS, LineImage, LineModel, LineResult, heat_scale
from app.services.serving import ActiveLineModel, LineBatcher, QueueFull
from app.services.spool import SpooledFeed
from app.services.tokens import TOKEN_SECRET, ServeTokens
from dmad_core.errors import Invalid, TooLarge, UserError

API_VERSION = "1"


@dataclass(frozen=True)
class ServeConfig:
    """How `dmad serve` runs: where it listens, how it batches, what it accepts."""

    host: str = "127.0.0.1"  # loopback: another machine reaches it only when the engineer says so
    port: int = 8000
    max_batch: int = 4  # images per backbone call: 4 is the fastest on 2 CPU cores (benchmarks/serve.py)
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    max_queue: int = 64  # requests waiting past this get 503
    max_upload_bytes: int = 64 * 1024 * 1024
    max_pixels: int = MAX_PIXELS
    feed: bool = True  # scored images join the pool
    poll_s: float = 2.0  # how often a promotion is looked for


class Patch(BaseModel):
    box: list[int] = Field(description="x0, y0, x1, y1 in image pixels (x1, y1 exclusive)")
    score: float


class HeatmapRLE(BaseModel):
    format: Literal["labelstudio-brush-rle"] = "labelstudio-brush-rle"
    width: int
    height: int
    rle: list[int] = Field(description="the defect mask (heat map above the version's pixel threshold)")


class ScoreResponse(BaseModel):
    category: str
    score: float
    decision: Literal["OK", "NG"]
    threshold: float
    threshold_source: Literal["calibrated", "override", "global"]
    model_version: str
    sha256: str
    width: int
    height: int
    top_patches: list[Patch]
    heatmap_png: str | None = Field(None, description="base64 8-bit PNG: 0 the class's ordinary level, 255 its threshold or above")
    heatmap_rle: HeatmapRLE | None = None


class ClassInfo(BaseModel):
    threshold: float
    source: str


class VersionResponse(BaseModel):
    model_version: str
    classes: dict[str, ClassInfo]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model_version: str
    queue_depth: int


class ErrorResponse(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in
    ((401, "missing or wrong token"), (404, "unknown class"), (413, "upload over the size or pixel limit"),
     (415, "not an image body"), (422, "bad request or unreadable image"), (503, "queue full: retry after"))
}

_BODY_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}, "category": {"type": "string"}}}},
        },
    }
}


class UnsupportedBody(Invalid):
    """The body is neither an image nor a multipart upload."""


def heatmap_png(line: LineModel, result: LineResult) -> str:
    lo, hi = heat_scale(line.model.validation_scores_.get(result.category), result.threshold)
    gray = np.clip((line.heatmap(result) - lo) / (hi - lo), 0, 1) * 255
    buffer = io.BytesIO()
    PIL.Image.fromarray(gray.astype(np.uint8), "L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def heatmap_rle(line: LineModel, result: LineResult) -> HeatmapRLE:
    """The proposed defect mask, the one Label Studio's pre-annotation shows (``heatmap_mask``)."""
    from annotation.rle import mask_to_rle
    from app.services.labelstudio import heatmap_mask

    threshold = line.model.pixel_threshold_
    mask = np.zeros((result.height, result.width), dtype=bool) if threshold is None else heatmap_mask(
        result.patch_map, result.height, result.width, threshold, line.model.config,
        line.model.mask_peak_shares_.get(result.category))
    return HeatmapRLE(width=result.width, height=result.height, rle=mask_to_rle(mask))


async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes ``limit`` bytes: never read whole first."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the upload is {int(declared)} bytes, over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the upload is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_and_category(request: Request, category: str | None, limit: int) -> tuple[bytes, str]:
    body = await _read_limited(request, limit)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=4)
        except Exception as exc:  # malformed multipart
            raise Invalid(f"malformed multipart body: {exc}") from exc
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise Invalid("the multipart body has no file field named 'file'")
        data = await upload.read()
        field = form.get("category")
        category = category or (field if isinstance(field, str) else None)
        await form.close()
    elif content_type.startswith("image/") or content_type == "application/octet-stream":
        data = body
    else:
        raise UnsupportedBody(f"send the image as the body (Content-Type image/png, image/jpeg or "
                              f"application/octet-stream) or as multipart field 'file', not {content_type or 'no type'!r}")
    if not category:
        raise Invalid("say which product class the image is: ?category=NAME")
    return data, category


def create_app(home: Home, sessions: sessionmaker[Session], config: ServeConfig = ServeConfig(),
               token: str | None = None, loader: Callable[..., LineModel] = LineModel.load) -> FastAPI:
    """The scoring service of ``home``. ``token`` (default: the home's ``serve_token`` secret) is what
    clients must send; the model is loaded when the app starts (its lifespan), not here, by ``loader``
    (``LineModel.load``; benchmarks/serve.py passes its kNN-baseline variant)."""
    tokens = ServeTokens(home, token)  # the home's token is re-read when `dmad token rotate` replaces it
    if not tokens.configured:
        raise Invalid(f"no API token: run `dmad serve` once to create {home.secrets_dir / TOKEN_SECRET}")
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        holder = await run_in_threadpool(ActiveLineModel, home, sessions, loader)
        batcher = LineBatcher(config.max_batch, config.max_wait_ms / 1000, config.max_queue,
                              keep=spooled.keep if spooled else None).start()
        stop = threading.Event()
        poller = threading.Thread(target=holder.poll, args=(stop, config.poll_s), name="version-poller", daemon=True)
        poller.start()
        if spooled:  # what a killed serve or a database outage left is fed once the database answers
            threading.Thread(target=spooled.run_replayer, args=(stop, config.poll_s), name="spool-replayer",
                             daemon=True).start()
        state.update(holder=holder, batcher=batcher)
        try:
            yield
        finally:
            stop.set()
            batcher.stop()
            poller.join(timeout=10)

    app = FastAPI(title="DMAD line scoring", version=API_VERSION, lifespan=lifespan,
                  description="Scores product images with the active DMAD model version: score, OK/NG by "
                              "the class's threshold, top patches and heat map.")
    metrics = app.state.metrics = ServeMetrics()
    # the feed goes through a spool on the home's disk: an image answered 200 survives the database away
    spooled = SpooledFeed(home, sessions, metrics.feed_failures.inc, metrics.spool_replayed.inc) if config.feed else None
    metrics.watch(lambda: state["batcher"].depth if "batcher" in state else 0,
                  lambda: (state["holder"].current.version, state["holder"].current.version_id),
                  spooled.spool.count_images if spooled else None)
    instrument(app, metrics)
    bearer = HTTPBearer(auto_error=False, description="the home's serve_token secret")

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or not tokens.accepts(credentials.credentials):
            raise _Unauthorised()

    @app.exception_handler(_Unauthorised)
    async def unauthorised(request: Request, exc: _Unauthorised) -> JSONResponse:
        return JSONResponse({"detail": "send Authorization: Bearer <token> (the home's serve_token secret)"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's own parameter errors, in the one error shape ({"detail": "<what to fix>"})."""
        problems = "; ".join(f"{' '.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
                             for e in exc.errors())
        return JSONResponse({"detail": problems or "invalid request"}, status_code=422)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        status = 415 if isinstance(exc, UnsupportedBody) else http_status(exc)
        retry_after = getattr(exc, "retry_after", None)  # QueueFull, SpoolFull
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    @app.get("/v1/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        return HealthResponse(status="ok", model_version=state["holder"].current.version,
                              queue_depth=state["batcher"].depth)

    @app.get("/v1/version", response_model=VersionResponse, dependencies=[Depends(authorised)],
             responses={401: ERRORS[401]})
    async def version() -> VersionResponse:
        line: LineModel = state["holder"].current
        return VersionResponse(model_version=line.version, classes={
            c: ClassInfo(threshold=t.threshold, source=t.source) for c, t in line.thresholds.items()})

    @app.post("/v1/score", response_model=ScoreResponse, dependencies=[Depends(authorised)],
              responses={s: ERRORS[s] for s in (401, 404, 413, 415, 422, 503)}, openapi_extra=_BODY_SCHEMA)
    async def score(request: Request,
                    category: str | None = Query(None, min_length=1, max_length=200, description="the product class"),
                    heatmap: Literal["none", "png", "rle"] = Query("none", description="add the heat map")) -> ScoreResponse:
        data, category = await _image_and_category(request, category, config.max_upload_bytes)
        line: LineModel = state["holder"].current  # this request is scored by the version in force now
        line.check_category(category)
        image = await run_in_threadpool(LineImage.from_bytes, data, category, "upload", config.max_pixels, config.feed)
        future = state["batcher"].submit(line, image)
        result: LineResult = await asyncio.wrap_future(future)
        metrics.decisions.labels(result.category, result.decision).inc()
        response = ScoreResponse(
            category=result.category, score=result.score, decision=result.decision, threshold=result.threshold,
            threshold_source=result.threshold_source, model_version=result.version, sha256=result.content_hash,
            width=result.width, height=result.height, top_patches=[Patch(**p) for p in result.top_patches])
        if heatmap == "png":
            response.heatmap_png = await run_in_threadpool(heatmap_png, line, result)
        elif heatmap == "rle":
            response.heatmap_rle = await run_in_threadpool(heatmap_rle, line, result)
        return response

    return app


class _Unauthorised(Exception):
    """No or a wrong bearer token."""
