"""The webhook receiver: Label Studio posts each new, changed or deleted annotation here.

A small Starlette app served by uvicorn (the ASGI stack of `dmad serve` too), because it only parses,
checks and hands over: Label Studio waits about a second for an answer and never retries, so the sink
must only store and enqueue (it runs in a worker thread, off the event loop), and :mod:`annotation.sync`
pulls whatever a missed delivery lost. Until 2026-12 this was the standard library's
``ThreadingHTTPServer``: 300 concurrent malformed posts from 64 clients got 285 answers and 15 connection
resets there (a listen backlog of 5); this one listens with a backlog of 2048.

Routes:

* ``POST /webhook``: Label Studio's payload. The shared secret travels in the ``X-DMAD-Secret`` header
  (set on the webhook by :func:`annotation.project.ensure_webhook`).
* ``GET /images/<content_hash>``: the image files Label Studio shows (see :mod:`annotation.project` for
  why we serve them here); only hashes the caller's lookup knows are served, never a path. The
  labelling UI loads images with ``crossOrigin="anonymous"`` (for its brush canvas), so these answers
  carry ``Access-Control-Allow-Origin`` (``*`` by default: no credentials are involved, and an image is
  only reachable by its full content hash).
* ``GET /health``.

Answers: every client error is a 4xx with a JSON body ``{"error": "..."}``, never a 5xx: 401 no secret,
403 wrong secret, 411 no Content-Length, 413 body over the cap (20 MB), 415 not JSON, 400 malformed JSON
or payload shape, 404 unknown image, 422 a mask that does not fit its image (or is corrupt); an error
the sink raises answers the status of its type (``dmad_core.errors.HTTP_STATUS``: ``NotFound`` 404, ``Invalid`` 422,
``Conflict`` 409, ``Unavailable`` 503); 500 only for our own bugs (logged). Actions other than the four
annotation actions are answered 200 ``{"outcome": "ignored"}``: Label Studio may be configured to send
more than we need, and a 4xx would only fill its log. A payload is checked completely before anything is
stored, so a bad item in a bulk delivery stores nothing. An empty annotation (nothing drawn, no verdict,
or a skipped task) is answered 200 ``"ignored_empty"`` and stores nothing; if it replaced a label we
hold, the next sync removes that label (see :mod:`annotation.sync`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import mimetypes
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from annotation.parse import ParsedAnnotation, PayloadError, annotation_id, parse_annotation, task_image_id
from annotation.project import SECRET_HEADER
from annotation.sink import AnnotationSink, UnknownImageError
from dmad_core.errors import Conflict, UserError, http_status

log = logging.getLogger(__name__)

MAX_BODY = 20 * 1024 * 1024
_DRAIN_LIMIT = 64 * 1024 * 1024  # bodies up to this are read and dropped so the client gets our answer
RECORD_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED")
DELETE_ACTIONS = ("ANNOTATIONS_DELETED",)
_HASH = re.compile(r"[0-9a-f]{8,128}")
BACKLOG = 2048
READ_TIMEOUT_S = 15  # seconds a client may take to send its body
RETRY_AFTER_S = 10  # what a 503 (the sink unavailable) asks the client to wait

ImageLookup = Callable[[str], "Path | None"]


class WebhookServer:
    """The receiver: a Starlette app (``app``) served by uvicorn on a socket bound at construction, so that
    a taken port fails at once and ``port=0`` has its ``url`` before serving. Its configuration lives on it
    (no module state). The same ASGI stack as `dmad serve`; the listen backlog is 2048, so a burst of
    clients waits in the kernel instead of being reset (the standard library's server listened with 5)."""

    def __init__(self, address: tuple[str, int], sink: AnnotationSink, secret: str,
                 image_path: ImageLookup | None = None, max_body: int = MAX_BODY, cors_origin: str = "*",
                 read_timeout: float = READ_TIMEOUT_S) -> None:
        if not secret:
            raise ValueError("the webhook secret must not be empty")
        self.read_timeout = read_timeout
        self.sink = sink
        self.secret = secret.encode()
        self.image_path = image_path
        self.max_body = max_body
        self.cors_origin = cors_origin
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind(address)
            self.socket.listen(BACKLOG)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        self.app = webhook_app(self)
        self._server: Any = None
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def started(self) -> bool:
        """Whether it accepts connections."""
        return self._server is not None and self._server.started

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (or a signal uvicorn handles when this runs in the main thread)."""
        import uvicorn

        config = uvicorn.Config(self.app, log_level="warning", access_log=False, timeout_keep_alive=15,
                                backlog=BACKLOG, lifespan="off")
        self._server = uvicorn.Server(config)
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop serving: answers in progress finish, then :meth:`serve_forever` returns."""
        if self._server is not None:
            self._server.should_exit = True
            self._stopped.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


def make_webhook_server(host: str, port: int, handler: AnnotationSink, secret: str, *,
                        image_path: ImageLookup | None = None, max_body: int = MAX_BODY,
                        cors_origin: str = "*", read_timeout: float = READ_TIMEOUT_S) -> WebhookServer:
    """A bound, not yet serving, receiver (``port=0`` picks a free port; see ``server.url``). A client that
    sends less body than it declared gets 400 after ``read_timeout`` seconds; one that hangs up mid-body
    has gone, and gets nothing (nothing is stored either way).

    Serve with ``server.serve_forever()`` (or :func:`serve_in_thread`); stop with ``server.shutdown()``
    then ``server.server_close()``.
    """
    try:
        return WebhookServer((host, port), handler, secret, image_path, max_body, cors_origin, read_timeout)
    except OSError as exc:
        raise Conflict(f"cannot listen on {host}:{port} for webhooks: {exc.strerror or exc}") from exc


def serve_in_thread(server: WebhookServer) -> threading.Thread:
    """Serves ``server`` from a daemon thread (tests, and `dmad up` next to other services); returns once
    it accepts connections."""
    thread = threading.Thread(target=server.serve_forever, name="dmad-webhook", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive():
        if time.monotonic() > deadline:
            raise RuntimeError("the webhook receiver did not start within 30 s")
        time.sleep(0.01)
    return thread


@dataclass(frozen=True)
class _Reply:
    status: int
    body: dict[str, Any]
    close: bool = False  # the connection cannot carry another request (its body was not read to its end)


def _error(status: int, message: str) -> _Reply:
    return _Reply(status, {"error": message})


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pairs(payload: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(annotation, task) pairs of a created/updated delivery (one, or many for ANNOTATIONS_CREATED)."""
    annotations = payload.get("annotation")
    tasks = payload.get("task")
    if annotations is None:
        raise PayloadError("payload has no annotation")
    if tasks is None:
        raise PayloadError("payload has no task")
    if isinstance(annotations, dict):
        annotations = [annotations]
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(annotations, list) or not isinstance(tasks, list):
        raise PayloadError("annotation and task must be objects or lists of objects")
    if not annotations:
        raise PayloadError("payload has no annotation")
    by_id = {t["id"]: t for t in tasks if isinstance(t, dict) and _is_id(t.get("id"))}
    pairs = []
    for annotation in annotations:
        if not isinstance(annotation, dict):
            raise PayloadError("annotation must be an object")
        task_ref = annotation.get("task")
        if isinstance(task_ref, dict):
            task_ref = task_ref.get("id")
        if _is_id(task_ref) and task_ref in by_id:
            pairs.append((annotation, by_id[task_ref]))
        elif len(tasks) == 1:
            pairs.append((annotation, tasks[0]))
        else:
            raise PayloadError(f"no task in the payload for annotation {annotation.get('id')!r}")
    return pairs


def handle_payload(payload: Any, sink: AnnotationSink) -> _Reply:
    """Checks a decoded webhook payload completely, then hands it to the sink."""
    if not isinstance(payload, dict):
        raise PayloadError("payload must be a JSON object")
    action = payload.get("action")
    if not isinstance(action, str):
        raise PayloadError("payload has no action")
    if action in DELETE_ACTIONS:
        items = payload.get("annotations")
        if not isinstance(items, list):
            raise PayloadError("annotations must be a list")
        ids = [annotation_id(item) for item in items]
        deleted = sum(1 for external_id in ids if sink.delete(external_id=external_id))
        return _Reply(200, {"outcome": "deleted", "deleted": deleted, "received": len(ids)})
    if action not in RECORD_ACTIONS:
        return _Reply(200, {"outcome": "ignored", "action": action[:100]})

    parsed: list[ParsedAnnotation] = []
    for annotation, task in _pairs(payload):
        annotation_id(annotation)  # a missing id is a 400 before any 404
        image_id = task_image_id(task)
        size = sink.image_size(image_id)
        if size is None:
            raise UnknownImageError(f"image {image_id} is not known here")
        parsed.append(parse_annotation(annotation, task, image_size=size))
    outcomes = []
    for item in parsed:
        if item.kind is None:
            outcomes.append({"id": item.external_id, "outcome": "ignored_empty"})
            continue
        outcome = sink.record(image_id=item.image_id, kind=item.kind, mask=item.mask,
                              external_id=item.external_id, updated_at=item.updated_at)
        outcomes.append({"id": item.external_id, "outcome": outcome, "kind": item.kind})
    body: dict[str, Any] = {"outcome": outcomes[0]["outcome"] if len(outcomes) == 1 else "many",
                            "results": outcomes}
    return _Reply(200, body)


def _json(reply: _Reply) -> Response:
    headers = {"Connection": "close"} if reply.close else {}
    if reply.status == 503:  # the sink is unavailable for now (its database away, its disk full)
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return JSONResponse(reply.body, status_code=reply.status, headers=headers or None)


def webhook_app(server: WebhookServer) -> Starlette:
    """The receiver's routes (see the module docstring) over ``server``'s sink, secret and limits."""

    async def health(request: Request) -> Response:
        return _json(_Reply(200, {"status": "ok"}))

    async def image(request: Request) -> Response:
        content_hash = request.path_params["content_hash"]
        if not _HASH.fullmatch(content_hash):
            return _json(_error(404, "not found"))
        lookup = server.image_path
        try:
            path = await run_in_threadpool(lookup, content_hash) if lookup is not None else None
        except UserError as exc:  # e.g. Unavailable: the database away
            return _json(_error(http_status(exc), str(exc)))
        except Exception:
            log.exception("image lookup failed for %s", content_hash)
            return _json(_error(500, "image lookup failed"))
        if path is None or not Path(path).is_file():
            return _json(_error(404, "unknown image"))
        data = await run_in_threadpool(Path(path).read_bytes)
        return Response(data, media_type=mimetypes.guess_type(str(path))[0] or "application/octet-stream",
                        headers={"Cache-Control": "private, max-age=3600",
                                 "Access-Control-Allow-Origin": server.cors_origin})

    async def webhook(request: Request) -> Response:
        return _json(await _post(request, server))

    async def not_found(request: Request) -> Response:
        if request.method == "POST":
            return _json(await _refuse(request, _content_length(request), 404, "not found"))
        return _json(_error(404, "not found"))

    async def not_allowed(request: Request) -> Response:
        return _json(_error(405, "method not allowed"))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/images/{content_hash}", image, methods=["GET"]),
        Route("/webhook", webhook, methods=["POST"]),
        Route("/webhook", not_allowed, methods=["PUT", "DELETE", "PATCH"]),
        Route("/{rest:path}", not_found, methods=["GET", "POST"]),
        Route("/{rest:path}", not_allowed, methods=["PUT", "DELETE", "PATCH"]),
    ]
    app = Starlette(routes=routes)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("webhook request failed", exc_info=exc)
        return _json(_error(500, "internal error (logged)"))

    app.add_exception_handler(Exception, internal_error)
    return app


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None or not raw.strip().isdigit():
        return None
    return int(raw.strip())


async def _drain(request: Request, length: int) -> bool:
    """Read and drop a body we refuse, so the client reads our answer instead of a reset connection (up to
    ``_DRAIN_LIMIT``); False when it was not read (the connection then closes after the answer)."""
    if length > _DRAIN_LIMIT:
        return False
    try:
        async for _ in request.stream():
            pass
    except ClientDisconnect:
        return False
    return True


async def _refuse(request: Request, length: int | None, status: int, message: str) -> _Reply:
    drained = await _drain(request, length or 0)
    return _Reply(status, {"error": message}, close=not drained)


async def _post(request: Request, server: WebhookServer) -> _Reply:
    length = _content_length(request)
    provided = request.headers.get(SECRET_HEADER)
    if provided is None:
        return await _refuse(request, length, 401, f"missing {SECRET_HEADER} header")
    if not hmac.compare_digest(provided.encode("utf-8", "replace"), server.secret):
        return await _refuse(request, length, 403, f"wrong {SECRET_HEADER}")
    if length is None:
        return _Reply(411, {"error": "Content-Length is required"}, close=True)
    if length > server.max_body:
        return await _refuse(request, length, 413, f"body over {server.max_body} bytes")
    try:
        body = await asyncio.wait_for(_read(request), timeout=server.read_timeout)
    except (TimeoutError, asyncio.TimeoutError, ClientDisconnect):
        return _Reply(400, {"error": "body could not be read"}, close=True)
    if len(body) != length:
        return _error(400, "body shorter than its Content-Length")
    content_type = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        return _error(415, "Content-Type must be application/json")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return _error(400, f"malformed JSON: {str(exc)[:200]}")
    return await run_in_threadpool(_deliver, payload, server.sink)


async def _read(request: Request) -> bytes:
    chunks = []
    async for chunk in request.stream():
        chunks.append(chunk)
    return b"".join(chunks)


def _deliver(payload: Any, sink: AnnotationSink) -> _Reply:
    """The sink's work (database writes) off the event loop, every failure an answer."""
    try:
        return handle_payload(payload, sink)
    except PayloadError as exc:
        return _error(exc.status, str(exc))
    except (UnknownImageError, LookupError) as exc:
        return _error(404, str(exc))
    except UserError as exc:  # the sink refused the content: its type says why
        return _error(http_status(exc), str(exc))
    except ValueError as exc:  # a sink without typed errors (MemorySink) refusing the content
        return _error(422, str(exc))
    except RecursionError:
        return _error(400, "payload nested too deeply")
    except Exception:
        log.exception("webhook delivery failed")
        return _error(500, "internal error (logged)")
