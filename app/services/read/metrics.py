"""Metrics an engineer can scrape (Prometheus text format, prometheus-client).

Each running app owns one ``CollectorRegistry`` (never the library's global default registry), so two
services in one process, or two tests, never share a counter. Names follow Prometheus conventions:
counters end in ``_total``, durations are ``_seconds`` histograms, labels have bounded values (a route
template, never a raw path; a job type; a class name).

- ``ServeMetrics`` (``dmad serve``, ``GET /metrics``): requests and latency per route, method and status;
  OK/NG decisions per class; the scoring queue's depth; the version served; the spool of images waiting for
  the database (docs/line.md).
- ``WorkerMetrics`` (``dmad worker --metrics-port`` or ``--metrics-file``): job durations and failures by
  type, re-ranking progress of the active version, seconds from a retrain's queueing to its version being
  active.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, write_to_textfile
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Latency buckets for a CPU scorer: a single image is ~0.1-0.5 s on 2 cores, a full queue seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
JOB_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)


class _Callback(Collector):
    """A gauge whose value is read when scraped (``read`` returns {label tuple: value}); a failing read
    leaves the gauge out of that scrape rather than failing it."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...], read: Callable[[], dict[tuple[str, ...], float]]):
        self.name, self.doc, self.labels, self.read = name, doc, labels, read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            values = self.read()
        except Exception:  # noqa: BLE001 - e.g. the database is away: the other metrics still scrape
            log.debug("metric %s not read", self.name, exc_info=True)
            return []
        family = GaugeMetricFamily(self.name, self.doc, labels=list(self.labels))
        for key, value in values.items():
            family.add_metric(list(key), value)
        return [family]


class ServeMetrics:
    """The scoring service's metrics; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("dmad_serve_requests_total", "HTTP requests answered, by route template, "
                                "method and status", ["route", "method", "status"], registry=r)
        self.latency = Histogram("dmad_serve_request_duration_seconds", "Time from a request's arrival to its "
                                 "answer, by route template, method and status", ["route", "method", "status"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.decisions = Counter("dmad_serve_decisions_total", "Images scored, by class and OK/NG decision",
                                 ["category", "decision"], registry=r)
        self.feed_failures = Counter("dmad_serve_feed_failures_total", "Scored batches that could not be "
                                     "written to the pool at once (spooled for replay instead)", registry=r)
        self.spool_replayed = Counter("dmad_serve_spool_replayed_total", "Spooled images written to the pool "
                                      "after the database came back", registry=r)

    def watch(self, queue_depth: Callable[[], int], version: Callable[[], tuple[str, int]],
              spooled: Callable[[], int] | None = None, reserve: Callable[[], int] | None = None) -> None:
        """Gauges read at scrape time: the scoring queue's depth, the version served (name label, id value),
        images spooled on disk waiting for the database, the spool's reserve for a full disk."""
        Gauge("dmad_serve_queue_depth", "Requests waiting for the scorer", registry=self.registry).set_function(
            lambda: float(queue_depth()))
        def served() -> dict[tuple[str, ...], float]:
            name, version_id = version()
            return {(name,): float(version_id)}

        self.registry.register(_Callback("dmad_serve_active_version", "The model version served (value: its id)",
                                         ("version",), served))
        if spooled is not None:
            Gauge("dmad_serve_spooled_images", "Scored images on the home's disk waiting for the database",
                  registry=self.registry).set_function(lambda: float(spooled()))
        if reserve is not None:
            Gauge("dmad_serve_spool_reserve_bytes", "Disk space the spool holds for a full disk (0: a full disk "
                  "has taken it, and serve answers 503 once what it freed is spent)",
                  registry=self.registry).set_function(lambda: float(reserve()))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class WorkerMetrics:
    """A worker's metrics, exposed on its own port (``serve_http``) or written to a node-exporter textfile
    collector file (``write_textfile``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter("dmad_worker_jobs_total", "Jobs this worker ran to an end, by type and outcome "
                            "(succeeded, failed, lost: its lease was taken over)", ["type", "outcome"], registry=r)
        self.duration = Histogram("dmad_worker_job_duration_seconds", "Time a job ran on this worker, by type "
                                  "and outcome", ["type", "outcome"], buckets=JOB_BUCKETS, registry=r)
        self.failures = Counter("dmad_worker_job_failures_total", "Jobs that failed on this worker, by type and "
                                "error class", ["type", "error"], registry=r)
        self.retrain_to_active = Histogram("dmad_worker_retrain_to_active_seconds", "From a (re)train job's "
                                           "queueing to its version being active", buckets=JOB_BUCKETS, registry=r)

    def watch(self, rerank: Callable[[], tuple[int, int, int]], queued: Callable[[], dict[str, int]]) -> None:
        """Gauges read at scrape time from the database: the active version's re-ranking (scored, pool,
        chunks open) and the queue's open jobs by type."""
        def rerank_values() -> dict[tuple[str, ...], float]:
            scored, pool, chunks = rerank()
            return {("scored",): scored, ("pool",): pool, ("chunks_open",): chunks}

        self.registry.register(_Callback("dmad_rerank_pool_images", "The active version's re-ranking: pool "
                                         "images scored, pool images, chunks still open", ("state",), rerank_values))
        self.registry.register(_Callback("dmad_queue_jobs", "Jobs queued or running, by type", ("type",),
                                         lambda: {(t,): float(n) for t, n in queued().items()}))

    def observe_job(self, job_type: str, outcome: str, seconds: float, error: str | None = None) -> None:
        self.jobs.labels(job_type, outcome).inc()
        self.duration.labels(job_type, outcome).observe(seconds)
        if outcome == "failed":
            self.failures.labels(job_type, error or "unknown").inc()

    def serve_http(self, port: int, host: str = "127.0.0.1") -> Callable[[], None]:
        """Expose ``/metrics`` on ``host:port``; returns the function that stops the server."""
        from prometheus_client import start_http_server

        server, thread = start_http_server(port, addr=host, registry=self.registry)

        def close() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        return close

    def write_textfile(self, path: Path) -> None:
        """Write the metrics for node-exporter's textfile collector (atomically: a temporary name, renamed).
        A failure (a full disk) is logged, never the worker's."""
        try:
            os.makedirs(path.parent, exist_ok=True)
            write_to_textfile(str(path), self.registry)
        except OSError:
            log.warning("could not write the metrics file %s", path, exc_info=True)
