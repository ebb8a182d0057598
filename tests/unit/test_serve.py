"""`dmad serve`: the scoring API on a real trained home, through FastAPI's TestClient and through a real
uvicorn server on loopback (concurrent clients, the bounded queue, a promotion mid-stream)."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import select

from annotation.rle import rle_to_mask
from app.api.scoring import ServeConfig, create_app
from app.services.loop import versions
from db.models import Image, PoolScore
from tests.ui_fixtures import PreparedHome, ui_home, ui_template  # noqa: F401

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def png(seed: int = 0, shape: tuple[int, ...] = (64, 80, 3), mode: str | None = None) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def flat_png(width: int, height: int) -> bytes:
    """A large image in few bytes."""
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def client(ui_home: PreparedHome) -> Iterator[TestClient]:  # noqa: F811
    app = create_app(ui_home.home, ui_home.sessions(), ServeConfig(poll_s=0.2), token=TOKEN)
    with TestClient(app) as c:
        yield c


def test_score_raw_bytes_and_multipart_with_heat_maps(client: TestClient, ui_home: PreparedHome) -> None:  # noqa: F811
    r = client.post("/v1/score?category=tiles&heatmap=png", content=png(1), headers={**AUTH, "Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "v0002" and body["category"] == "tiles" and (body["width"], body["height"]) == (80, 64)
    assert body["decision"] == ("NG" if body["score"] > body["threshold"] else "OK")
    assert body["threshold_source"] == "calibrated" and body["top_patches"][0]["box"]
    with PIL.Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"]))) as heat:
        assert heat.size == (80, 64) and heat.mode == "L"

    r = client.post("/v1/score", params={"heatmap": "rle"}, headers=AUTH,
                    files={"file": ("part.png", png(2, (40, 40), "L"), "image/png")}, data={"category": "fabric"})
    assert r.status_code == 200, r.text
    rle = r.json()["heatmap_rle"]
    assert rle_to_mask(rle["rle"], rle["height"], rle["width"]).shape == (40, 40)

    # the scored images join the pool (after the answer, off the request's path), once each, with their score
    deadline = time.monotonic() + 30
    while True:
        with ui_home.sessions()() as session:
            fed = session.execute(select(Image.path, PoolScore.score).join(PoolScore, PoolScore.image_id == Image.id)
                                  .where(Image.path.startswith(str(ui_home.home.images_dir)))).all()
        if len(fed) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(fed) == 2 and any(abs(score - body["score"]) < 1e-3 for _, score in fed)


def test_health_version_and_auth(client: TestClient) -> None:
    assert client.get("/v1/health").json() == {"status": "ok", "model_version": "v0002", "queue_depth": 0}
    assert client.get("/v1/version").status_code == 401
    assert client.get("/v1/version", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.post("/v1/score?category=tiles", content=png(), headers={"Content-Type": "image/png"})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    version = client.get("/v1/version", headers=AUTH).json()
    assert version["model_version"] == "v0002" and set(version["classes"]) == {"fabric", "tiles"}


@pytest.mark.parametrize(("content", "headers", "query", "status", "says"), [
    (png(), {"Content-Type": "image/png"}, "category=washer", 404, "has no class 'washer'"),
    (b"\x89PNG\r\n\x1a\nbroken", {"Content-Type": "image/png"}, "category=tiles", 422, "unreadable image"),
    (b"", {"Content-Type": "image/png"}, "category=tiles", 422, "empty file"),
    (png(), {"Content-Type": "text/plain"}, "category=tiles", 415, "send the image as the body"),
    (png(), {"Content-Type": "image/png"}, "", 422, "?category=NAME"),
    (png(), {"Content-Type": "multipart/form-data; boundary=x"}, "category=tiles", 422, "multipart"),
    (flat_png(1000, 1200), {"Content-Type": "image/png"}, "category=tiles", 413, "megapixels"),
    (b"x" * 3_000_001, {"Content-Type": "image/png"}, "category=tiles", 413, "over the limit"),
])
def test_bad_requests_get_a_clear_4xx(ui_home: PreparedHome, content: bytes, headers: dict, query: str,  # noqa: F811
                                      status: int, says: str) -> None:
    app = create_app(ui_home.home, ui_home.sessions(), ServeConfig(max_upload_bytes=3_000_000, max_pixels=1_000_000,
                                                                   feed=False), token=TOKEN)
    with TestClient(app) as c:
        r = c.post(f"/v1/score?{query}", content=content, headers={**AUTH, **headers})
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]


def test_heat_map_of_a_version_saved_before_validation_scores(ui_home: PreparedHome) -> None:  # noqa: F811
    """A model folder written before `validation_scores` existed loads with None there (FittedState.load):
    its PNG heat map starts at 0, a typical normal patch, instead of answering 500."""
    from app.services.line.prediction import LineModel

    def saved_before(home, sessions):
        line = LineModel.load(home, sessions)
        line.model.fitted().validation_scores = None  # what FittedState.load reads from such a folder
        return line

    app = create_app(ui_home.home, ui_home.sessions(), ServeConfig(feed=False), token=TOKEN, loader=saved_before)
    with TestClient(app) as c:
        r = c.post("/v1/score?category=tiles&heatmap=png", content=png(3), headers={**AUTH, "Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    with PIL.Image.open(io.BytesIO(base64.b64decode(r.json()["heatmap_png"]))) as heat:
        assert heat.size == (80, 64)


# -- a real server on loopback ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving the app in a thread, as `dmad serve` does in its process."""

    def __init__(self, app, port: int):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, backlog=2048, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def hammer(url: str, clients: int, each: int, category: str = "tiles") -> list[tuple[int, float, dict, dict]]:
    """``clients`` threads, each posting ``each`` images one after another: (status, seconds, body, headers)."""
    out: list[tuple[int, float, dict, dict]] = []
    lock = threading.Lock()
    images = [png(i) for i in range(8)]

    def client(k: int) -> None:
        with httpx.Client(timeout=120) as http:
            for i in range(each):
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/score?category={category}", content=images[(k + i) % len(images)],
                              headers={**AUTH, "Content-Type": "image/png"})
                with lock:
                    out.append((r.status_code, time.perf_counter() - t0, r.json(), dict(r.headers)))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_64_concurrent_clients_get_answers_or_503_never_errors(ui_home: PreparedHome) -> None:  # noqa: F811
    app = create_app(ui_home.home, ui_home.sessions(), ServeConfig(max_queue=8, max_batch=8, feed=False), token=TOKEN)
    with Server(app, free_port()) as server:
        results = hammer(server.url, clients=64, each=2)
    statuses = [s for s, *_ in results]
    assert len(results) == 128 and set(statuses) <= {200, 503}, sorted(set(statuses))
    assert 200 in statuses
    for status, _, body, headers in results:
        if status == 503:
            assert headers.get("retry-after") == "1" and "queue is full" in body["detail"]
    latencies = sorted(t for s, t, *_ in results if s == 200)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"\n64 clients x 2 requests, queue bound 8: {statuses.count(200)} answered, {statuses.count(503)} x 503; "
          f"p50 {1000 * latencies[len(latencies) // 2]:.0f} ms, p99 {1000 * p99:.0f} ms")


def test_a_promotion_during_a_stream_of_requests_loses_none(ui_home: PreparedHome) -> None:  # noqa: F811
    app = create_app(ui_home.home, ui_home.sessions(), ServeConfig(poll_s=0.1, feed=False), token=TOKEN)
    with Server(app, free_port()) as server:
        done: list[list] = []
        stream = threading.Thread(target=lambda: done.append(hammer(server.url, clients=4, each=30)))
        stream.start()
        time.sleep(1.0)
        with ui_home.sessions()() as session:
            versions.promote(session, versions.get_version(session, "v0001").id)
        stream.join()
        after = httpx.get(f"{server.url}/v1/health").json()
    results = done[0]
    assert len(results) == 120 and {s for s, *_ in results} == {200}  # none dropped, none failed
    served = [body["model_version"] for _, _, body, _ in results]
    assert set(served) <= {"v0001", "v0002"} and "v0001" in served
    assert after["model_version"] == "v0001"
