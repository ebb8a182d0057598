"""The webhook receiver: Label Studio posts each new, changed or deleted annotation here.

A small standard-library HTTP service (``ThreadingHTTPServer``), because it only parses, checks and
hands over: Label Studio waits about a second for an answer and never retries, so the sink must only
store and enqueue, and :mod:`annotation.sync` pulls whatever a missed delivery lost.

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
the sink raises answers the status of its type (:data:`HTTP_STATUS`: ``NotFound`` 404, ``Invalid`` 422,
``Conflict`` 409, ``Unavailable`` 503); 500 only for our own bugs (logged). Actions other than the four
annotation actions are answered 200 ``{"outcome": "ignored"}``: Label Studio may be configured to send
more than we need, and a 4xx would only fill its log. A payload is checked completely before anything is
stored, so a bad item in a bulk delivery stores nothing. An empty annotation (nothing drawn, no verdict,
or a skipped task) is answered 200 ``"ignored_empty"`` and stores nothing; if it replaced a label we
hold, the next sync removes that label (see :mod:`annotation.sync`).
"""

from __future__ import annotations

import hmac
import json
import logging
import mimetypes
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from annotation.parse import ParsedAnnotation, PayloadError, annotation_id, parse_annotation, task_image_id
from annotation.project import SECRET_HEADER
from annotation.sink import AnnotationSink, UnknownImageError
from dmad_core.errors import Conflict, Invalid, NotFound, TooLarge, Unavailable, UserError

log = logging.getLogger(__name__)

MAX_BODY = 20 * 1024 * 1024
_DRAIN_LIMIT = 64 * 1024 * 1024  # bodies up to this are read and dropped so the client gets our answer
RECORD_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED")
DELETE_ACTIONS = ("ANNOTATIONS_DELETED",)
_IMAGE_PATH = re.compile(r"^/images/([0-9a-f]{8,128})$")

ImageLookup = Callable[[str], "Path | None"]


class WebhookServer(ThreadingHTTPServer):
    """The receiver's server; its configuration lives on it (no module state)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sink: AnnotationSink, secret: str,
                 image_path: ImageLookup | None = None, max_body: int = MAX_BODY, cors_origin: str = "*") -> None:
        if not secret:
            raise ValueError("the webhook secret must not be empty")
        self.sink = sink
        self.secret = secret.encode()
        self.image_path = image_path
        self.max_body = max_body
        self.cors_origin = cors_origin
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_webhook_server(host: str, port: int, handler: AnnotationSink, secret: str, *,
                        image_path: ImageLookup | None = None, max_body: int = MAX_BODY,
                        cors_origin: str = "*") -> WebhookServer:
    """A bound, not yet serving, receiver (``port=0`` picks a free port; see ``server.url``).

    Serve with ``server.serve_forever()`` (or :func:`serve_in_thread`); stop with ``server.shutdown()``
    then ``server.server_close()``.
    """
    try:
        return WebhookServer((host, port), handler, secret, image_path, max_body, cors_origin)
    except OSError as exc:
        raise Conflict(f"cannot listen on {host}:{port} for webhooks: {exc.strerror or exc}") from exc


def serve_in_thread(server: WebhookServer, poll_interval: float = 0.1) -> threading.Thread:
    """Serves ``server`` from a daemon thread (tests, and `dmad up` next to other services).
    ``poll_interval`` bounds how long ``server.shutdown()`` waits."""
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval,), name="dmad-webhook",
                              daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True)
class _Reply:
    status: int
    body: dict[str, Any]


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


class _Handler(BaseHTTPRequestHandler):
    server: WebhookServer
    timeout = 15  # seconds a client may take to send its request
    server_version = "dmad-webhook"
    sys_version = ""

    # -- plumbing ---------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, reply: _Reply) -> None:
        data = json.dumps(reply.body).encode()
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client went away before the answer (%s)", reply.status)

    def _drain(self, length: int) -> None:
        if length > _DRAIN_LIMIT:
            self.close_connection = True
            return
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)

    def _content_length(self) -> int | None:
        raw = self.headers.get("Content-Length")
        if raw is None or not raw.strip().isdigit():
            return None
        return int(raw.strip())

    # -- routes -----------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(_Reply(200, {"status": "ok"}))
            return
        match = _IMAGE_PATH.match(path)
        if match is None:
            self._send(_error(404, "not found"))
            return
        self._send_image(match.group(1))

    def _send_image(self, content_hash: str) -> None:
        lookup = self.server.image_path
        try:
            path = lookup(content_hash) if lookup is not None else None
        except Exception:
            log.exception("image lookup failed for %s", content_hash)
            self._send(_error(500, "image lookup failed"))
            return
        if path is None or not Path(path).is_file():
            self._send(_error(404, "unknown image"))
            return
        data = Path(path).read_bytes()
        try:
            self.send_response(200)
            self.send_header("Content-Type", mimetypes.guess_type(str(path))[0] or "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "private, max-age=3600")
            self.send_header("Access-Control-Allow-Origin", self.server.cors_origin)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        reply = self._post()
        self._send(reply)

    def do_PUT(self) -> None:  # noqa: N802
        self._send(_error(405, "method not allowed"))

    do_DELETE = do_PATCH = do_PUT  # noqa: N815

    def _post(self) -> _Reply:
        length = self._content_length()
        if self.path.split("?", 1)[0] != "/webhook":
            self._drain(length or 0)
            return _error(404, "not found")
        provided = self.headers.get(SECRET_HEADER)
        if provided is None:
            self._drain(length or 0)
            return _error(401, f"missing {SECRET_HEADER} header")
        if not hmac.compare_digest(provided.encode("utf-8", "replace"), self.server.secret):
            self._drain(length or 0)
            return _error(403, f"wrong {SECRET_HEADER}")
        if length is None:
            self.close_connection = True
            return _error(411, "Content-Length is required")
        if length > self.server.max_body:
            self._drain(length)
            return _error(413, f"body over {self.server.max_body} bytes")
        try:
            body = self.rfile.read(length)
        except (TimeoutError, OSError):
            self.close_connection = True
            return _error(400, "body could not be read")
        if len(body) != length:
            return _error(400, "body shorter than its Content-Length")
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            return _error(415, "Content-Type must be application/json")
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            return _error(400, f"malformed JSON: {str(exc)[:200]}")
        try:
            return handle_payload(payload, self.server.sink)
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


# The one table of HTTP statuses of typed errors (this receiver and `dmad serve` both answer by it); the
# first matching type wins, so a subtype comes before its base.
HTTP_STATUS: dict[type[UserError], int] = {NotFound: 404, TooLarge: 413, Invalid: 422, Conflict: 409, Unavailable: 503}


def http_status(exc: UserError) -> int:
    """The HTTP status of an error the sink raised, from its type (422 for a plain ``UserError``)."""
    for kind, status in HTTP_STATUS.items():
        if isinstance(exc, kind):
            return status
    return 422
