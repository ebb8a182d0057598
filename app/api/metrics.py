"""`GET /metrics` on `dmad serve`, and the ASGI middleware that times every request.

The middleware is plain ASGI (no BaseHTTPMiddleware): it wraps ``send`` to read the answer's status and
labels each request with its route template (``/v1/score``, never the raw path, so a scanner cannot blow
up the label set); a path no route matched is counted as ``unmatched``.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

from app.services.read.metrics import CONTENT_TYPE, ServeMetrics


class _Timed:
    """ASGI middleware: one count and one latency observation per HTTP request."""

    def __init__(self, app: Any, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            labels = (route_template(scope), scope.get("method", ""), str(status[0]))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)


def route_template(scope: dict[str, Any]) -> str:
    """The matched route's template with the prefixes of the routers it was included through
    (``/v1/score``), or ``unmatched``. FastAPI keeps an included router nested, so the leaf route knows only
    its own path (``/score``): the prefix is the part of the raw path before the part the route matched."""
    route = scope.get("route")
    template, regex = getattr(route, "path", None), getattr(route, "path_regex", None)
    if template is None:
        return "unmatched"
    raw = scope.get("path", "")
    for start in (i for i, c in enumerate(raw) if c == "/"):
        if regex is None or regex.match(raw[start:]):
            return raw[:start] + template
    return template


def instrument(app: FastAPI, metrics: ServeMetrics) -> None:
    """Time every request of ``app`` and answer ``GET /metrics`` (no token, like health: it names versions
    and classes, never images; the service listens on loopback unless told otherwise)."""
    app.add_middleware(_Timed, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def scrape() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)
