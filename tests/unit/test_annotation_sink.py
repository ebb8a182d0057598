"""The database-backed sink, on a real SQLite file, alone and behind the real receiver."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import requests
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from annotation.rle import brush_result
from annotation.sink import MemorySink, UnknownImageError
from annotation.webhook import make_webhook_server, serve_in_thread
from app.home_folder import Home
from app.services.labelstudio.sink import DatabaseSink
from app.services.loop.annotations import load_mask
from db.models import Annotation
from tests.db_fixtures import add_test_image, home, sqlite_engine, sqlite_sf, sqlite_url  # noqa: F401

T0 = datetime(2026, 2, 1, 8, 0, tzinfo=UTC)
W, H = 37, 23  # non-square


def _mask(y: int = 3, x: int = 5) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y : y + 6, x : x + 9] = True
    return mask


@pytest.fixture
def sink(sqlite_sf: sessionmaker[Session], home: Home) -> DatabaseSink:  # noqa: F811
    return DatabaseSink(home, sqlite_sf)


def test_database_sink_semantics(sink: DatabaseSink, sqlite_sf: sessionmaker[Session], tmp_path: Path,
                                 home: Home) -> None:  # noqa: F811
    with sqlite_sf() as session:
        image = add_test_image(session, tmp_path, "a", width=W, height=H)
        session.commit()
        image_id, content_hash, path = image.id, image.content_hash, image.path
    assert sink.image_size(image_id) == (H, W)
    assert sink.image_size(image_id + 1000) is None
    assert sink.image_path(content_hash) == Path(path)
    assert sink.image_path("0" * 64) is None

    later = T0 + timedelta(minutes=1)
    assert sink.record(image_id=image_id, kind="defect_mask", mask=_mask(), external_id="11", updated_at=T0) == "created"
    assert sink.record(image_id=image_id, kind="defect_mask", mask=_mask(), external_id="11", updated_at=T0) == "unchanged"
    assert sink.record(image_id=image_id, kind="defect_mask", mask=_mask(9, 20), external_id="11",
                       updated_at=later) == "updated"
    assert sink.record(image_id=image_id, kind="normal", mask=None, external_id="11", updated_at=T0) == "unchanged"
    assert sink.known_external_ids() == {"11"}
    with sqlite_sf() as session:
        row = session.scalars(select(Annotation).where(Annotation.external_id == "11")).one()
        assert (row.source, row.kind) == ("labelstudio", "defect_mask")
        assert np.array_equal(load_mask(row, home), _mask(9, 20))

    assert sink.delete(external_id="11") is True
    assert sink.delete(external_id="11") is False
    assert sink.known_external_ids() == set()
    with pytest.raises(UnknownImageError):
        sink.record(image_id=image_id + 1000, kind="normal", mask=None, external_id="12", updated_at=T0)


def test_receiver_on_the_database(sink: DatabaseSink, sqlite_sf: sessionmaker[Session], tmp_path: Path) -> None:
    with sqlite_sf() as session:
        image = add_test_image(session, tmp_path, "b", width=W, height=H)
        session.commit()
        image_id, content_hash = image.id, image.content_hash
    server = make_webhook_server("127.0.0.1", 0, sink, "s", image_path=sink.image_path)
    serve_in_thread(server)
    try:
        def post(ann_id: int, mask: np.ndarray, when: datetime) -> requests.Response:
            payload = {"action": "ANNOTATION_CREATED",
                       "annotation": {"id": ann_id, "task": 5, "updated_at": when.isoformat(),
                                      "result": [brush_result(mask, "defect", "image", "defect")]},
                       "task": {"id": 5, "data": {"image_id": image_id}}}
            return requests.post(f"{server.url}/webhook", data=json.dumps(payload), timeout=10,
                                 headers={"Content-Type": "application/json", "X-DMAD-Secret": "s"})

        assert post(21, _mask(), T0).json()["outcome"] == "created"
        assert post(21, _mask(), T0).json()["outcome"] == "unchanged"
        wrong = post(22, np.ones((W, H), dtype=bool), T0)
        assert wrong.status_code == 422 and "but the image is 37x23" in wrong.json()["error"]
        image_response = requests.get(f"{server.url}/images/{content_hash}", timeout=10)
        assert image_response.status_code == 200
        assert image_response.content == Path(sink.image_path(content_hash) or "").read_bytes()
    finally:
        server.shutdown()
        server.server_close()
    assert sink.known_external_ids() == {"21"}


def test_memory_sink_keeps_deletions_against_older_redeliveries() -> None:
    sink = MemorySink({1: (2, 3)})
    assert sink.record(image_id=1, kind="normal", mask=None, external_id="1", updated_at=T0) == "created"
    assert sink.delete(external_id="1")
    assert sink.record(image_id=1, kind="normal", mask=None, external_id="1", updated_at=T0) == "unchanged"
    assert sink.rows == {}
    later = T0 + timedelta(seconds=1)
    assert sink.record(image_id=1, kind="normal", mask=None, external_id="1", updated_at=later) == "updated"
    assert set(sink.rows) == {"1"}
