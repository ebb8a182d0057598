"""Metrics an engineer can scrape: `GET /metrics` on `dmad serve`, and a worker's metrics on its own port
and in a textfile-collector file, parsed with prometheus-client's own parser (so a malformed exposition
fails here, not in a factory's Prometheus)."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.api.scoring import ServeConfig, create_app
from app.services.read.metrics import WorkerMetrics
from app.worker import WorkerOptions, run_worker
from db import queue
from db.engine import write_transaction
from tests.processes import free_port
from tests.ui_fixtures import PreparedHome, ui_home, ui_template  # noqa: F401

TOKEN = "metrics-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, its labels): value} of a Prometheus text exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def families(text: str) -> dict[str, str]:
    """{family name: type}."""
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_serve_metrics_count_requests_latency_decisions_queue_and_version(ui_home: PreparedHome) -> None:  # noqa: F811
    app = create_app(ui_home.home, ui_home.sessions(), ServeConfig(feed=False), token=TOKEN)
    with TestClient(app) as client:
        for seed in range(3):
            assert client.post("/v1/score?category=tiles", content=png(seed),
                               headers={**AUTH, "Content-Type": "image/png"}).status_code == 200
        assert client.post("/v1/score?category=washer", content=png(9),
                           headers={**AUTH, "Content-Type": "image/png"}).status_code == 404
        assert client.get("/v1/health").status_code == 200
        assert client.get("/no/such/path/123").status_code == 404
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    got, kinds = samples(r.text), families(r.text)

    def value(name: str, **labels: str) -> float:
        return got.get((name, frozenset(labels.items())), 0.0)

    assert value("dmad_serve_requests_total", route="/v1/score", method="POST", status="200") == 3
    assert value("dmad_serve_requests_total", route="/v1/score", method="POST", status="404") == 1
    assert value("dmad_serve_requests_total", route="unmatched", method="GET", status="404") == 1  # not the raw path
    assert value("dmad_serve_request_duration_seconds_count", route="/v1/score", method="POST", status="200") == 3
    assert value("dmad_serve_request_duration_seconds_bucket", route="/v1/score", method="POST", status="200",
                 le="+Inf") == 3
    decided = {labels: v for (name, labels), v in got.items() if name == "dmad_serve_decisions_total"}
    assert sum(decided.values()) == 3 and all(dict(k)["category"] == "tiles" and dict(k)["decision"] in ("OK", "NG")
                                              for k in decided)
    assert value("dmad_serve_queue_depth") == 0
    assert value("dmad_serve_active_version", version="v0002") == ui_home.version_ids[-1]
    # Prometheus conventions: counters end in _total, histograms are in seconds
    for name, kind in kinds.items():
        assert name.startswith("dmad_"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
    assert kinds["dmad_serve_requests"] == "counter" and kinds["dmad_serve_decisions"] == "counter"
    assert "dmad_serve_requests_total" in r.text and "dmad_serve_decisions_total" in r.text


def test_two_apps_keep_their_own_counts(ui_home: PreparedHome) -> None:  # noqa: F811
    """A registry per app, not the library's global one: a second app starts from zero."""
    first = create_app(ui_home.home, ui_home.sessions(), ServeConfig(feed=False), token=TOKEN)
    second = create_app(ui_home.home, ui_home.sessions(), ServeConfig(feed=False), token=TOKEN)
    with TestClient(first) as a, TestClient(second) as b:
        a.get("/v1/health")
        a.get("/v1/health")
        text = b.get("/metrics").text
    assert ("dmad_serve_requests_total", frozenset({"route": "/v1/health", "method": "GET", "status": "200"}.items())) \
        not in samples(text)


def test_worker_metrics_in_a_textfile_and_on_a_port(ui_home: PreparedHome, tmp_path: Path) -> None:  # noqa: F811
    image = tmp_path / "upload.png"
    image.write_bytes(png(1))
    with ui_home.sessions()() as session, write_transaction(session):
        queue.enqueue(session, queue.JobType.SCORE_UPLOAD, queue.UploadToScore(path=str(image), category="tiles"))
        queue.enqueue(session, queue.JobType.SCORE_UPLOAD,
                      queue.UploadToScore(path=str(tmp_path / "missing.png"), category="tiles"))
    metrics_file = tmp_path / "collector" / "dmad_worker.prom"
    assert run_worker(ui_home.home, ui_home.sessions(), WorkerOptions(once=True, sync_every_seconds=None,
                                                                       metrics_file=str(metrics_file))) == 1
    got = samples(metrics_file.read_text())
    assert got[("dmad_worker_jobs_total", frozenset({"type": "score_upload", "outcome": "succeeded"}.items()))] == 1
    # the missing file fails each of its attempts (3 by default), each counted with its error class
    assert got[("dmad_worker_jobs_total", frozenset({"type": "score_upload", "outcome": "failed"}.items()))] == 3
    failures = {k: v for k, v in got.items() if k[0] == "dmad_worker_job_failures_total"}
    assert list(failures.values()) == [3] and dict(next(iter(failures))[1])["type"] == "score_upload"
    assert got[("dmad_worker_job_duration_seconds_count",
                frozenset({"type": "score_upload", "outcome": "succeeded"}.items()))] == 1
    pool = got[("dmad_rerank_pool_images", frozenset({"state": "pool"}.items()))]
    assert pool > 0 and got[("dmad_rerank_pool_images", frozenset({"state": "scored"}.items()))] <= pool
    assert ("dmad_queue_jobs", frozenset({"type": "retrain"}.items())) in got

    metrics = WorkerMetrics()
    metrics.retrain_to_active.observe(12.5)
    port = free_port()
    close = metrics.serve_http(port)
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        close()
    assert samples(text)[("dmad_worker_retrain_to_active_seconds_sum", frozenset())] == 12.5
