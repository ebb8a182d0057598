"""The webhook receiver against an in-memory sink, over real HTTP on an ephemeral port."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from annotation.parse import PayloadError, parse_annotation
from annotation.rle import brush_result
from annotation.sink import MemorySink
from annotation.webhook import WebhookServer, make_webhook_server, serve_in_thread

SECRET = "unit-test-secret"
SIZES = {1: (20, 31), 2: (30, 17)}  # image id -> (height, width), deliberately non-square
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def make_mask(image_id: int, seed: int) -> np.ndarray:
    h, w = SIZES[image_id]
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), dtype=bool)
    y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
    mask[y : y + 4, x : x + 3] = True
    return mask


def annotation_payload(
    ann_id: int, image_id: int, updated_at: datetime, *, mask: np.ndarray | None = None,
    verdict: str | None = None, action: str = "ANNOTATION_CREATED", task_id: int | None = None,
) -> dict[str, Any]:
    """A payload shaped like Label Studio 1.23's (checked against a real server in the integration tests)."""
    result: list[dict[str, Any]] = []
    if mask is not None:
        result.append(brush_result(mask, "defect", "image", "defect"))
    if verdict is not None:
        result.append({"type": "choices", "from_name": "verdict", "to_name": "image",
                       "value": {"choices": [verdict]}})
    task_id = task_id if task_id is not None else 100 + image_id
    return {
        "action": action,
        "annotation": {"id": ann_id, "result": result, "was_cancelled": False, "task": task_id,
                       "created_at": iso(T0), "updated_at": iso(updated_at), "project": 1},
        "task": {"id": task_id, "data": {"image": "http://x/images/ab", "image_id": image_id}, "project": 1},
        "project": {"id": 1},
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebhookServer]:
    image = tmp_path_factory.mktemp("images") / "img.png"
    image.write_bytes(b"\x89PNG fake")
    known = {"ab" * 32: image}
    server = make_webhook_server("127.0.0.1", 0, MemorySink(SIZES), SECRET, image_path=known.get)
    serve_in_thread(server)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture()
def receiver(server: WebhookServer) -> tuple[str, MemorySink]:
    """The module's server with a fresh, empty sink for each test."""
    sink = MemorySink(SIZES)
    server.sink = sink
    return server.url, sink


def post(url: str, payload: Any, *, secret: str | None = SECRET, raw: bytes | None = None,
         content_type: str = "application/json") -> requests.Response:
    headers = {"Content-Type": content_type}
    if secret is not None:
        headers["X-DMAD-Secret"] = secret
    body = raw if raw is not None else json.dumps(payload).encode()
    return requests.post(f"{url}/webhook", data=body, headers=headers, timeout=10)


# -- auth -------------------------------------------------------------------------------------------
def test_missing_secret_is_401_and_nothing_stored(receiver: tuple[str, MemorySink]) -> None:
    url, sink = receiver
    response = post(url, annotation_payload(1, 1, T0, verdict="normal"), secret=None)
    assert response.status_code == 401
    assert "error" in response.json()
    assert sink.rows == {} and sink.calls == 0


def test_a_burst_of_64_clients_gets_answers_not_resets(receiver: tuple[str, MemorySink]) -> None:
    """300 malformed posts from 64 concurrent clients: each gets its 401 (the standard library's server,
    with its listen backlog of 5, reset 15 of them)."""
    from concurrent.futures import ThreadPoolExecutor

    url, sink = receiver

    def attempt(i: int) -> int | str:
        try:
            return post(url, {"action": "ANNOTATION_CREATED", "junk": i}, secret=None).status_code
        except requests.ConnectionError as exc:
            return type(exc).__name__

    with ThreadPoolExecutor(64) as pool:
        outcomes = list(pool.map(attempt, range(300)))
    assert outcomes == [401] * 300
    assert sink.rows == {} and sink.calls == 0


@pytest.mark.parametrize("secret", ["wrong", "", SECRET + "x", SECRET[:-1], "ünïcode"])
def test_wrong_secret_is_403_and_nothing_stored(receiver: tuple[str, MemorySink], secret: str) -> None:
    url, sink = receiver
    headers = {"Content-Type": "application/json", "X-DMAD-Secret": secret.encode("utf-8")}
    body = json.dumps(annotation_payload(1, 1, T0, verdict="normal")).encode()
    response = requests.post(f"{url}/webhook", data=body, headers=headers, timeout=10)
    assert response.status_code == 403
    assert sink.rows == {} and sink.calls == 0


def test_empty_secret_cannot_be_configured() -> None:
    with pytest.raises(ValueError):
        WebhookServer(("127.0.0.1", 0), MemorySink(), "")


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [b"{", b"not json", b"\xff\xfe\x00", b"", b"[" * 100_000 + b"]" * 100_000])
def test_malformed_json_is_400(receiver: tuple[str, MemorySink], raw: bytes) -> None:
    url, sink = receiver
    response = post(url, None, raw=raw)
    assert response.status_code == 400
    assert "error" in response.json()
    assert sink.rows == {}


def test_wrong_content_type_is_415(receiver: tuple[str, MemorySink]) -> None:
    url, sink = receiver
    response = post(url, annotation_payload(1, 1, T0, verdict="normal"), content_type="text/plain")
    assert response.status_code == 415
    assert sink.rows == {}


def _without(payload: dict[str, Any], path: str) -> dict[str, Any]:
    payload = json.loads(json.dumps(payload))
    node = payload
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    del node[keys[-1]]
    return payload


@pytest.mark.parametrize(
    "path", ["action", "annotation", "annotation.id", "annotation.updated_at", "annotation.result", "task",
             "task.id", "task.data", "task.data.image_id"],
)
def test_missing_fields_are_400(receiver: tuple[str, MemorySink], path: str) -> None:
    url, sink = receiver
    response = post(url, _without(annotation_payload(1, 1, T0, mask=make_mask(1, 0)), path))
    assert response.status_code == 400, response.text
    assert "error" in response.json()
    assert sink.rows == {}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p["annotation"].update(id="x"),
        lambda p: p["annotation"].update(id=-3),
        lambda p: p["annotation"].update(id=10**40),
        lambda p: p["annotation"].update(updated_at="yesterday"),
        lambda p: p["annotation"].update(updated_at=12),
        lambda p: p["annotation"].update(result={"a": 1}),
        lambda p: p["annotation"].update(result=[1, 2]),
        lambda p: p["task"]["data"].update(image_id=True),
        lambda p: p["task"]["data"].update(image_id=[1]),
        lambda p: p.update(annotation=[]),
        lambda p: p.update(task="x"),
        lambda p: p["annotation"]["result"][0].update(value="x"),
        lambda p: p["annotation"]["result"][0].update(original_width="wide"),
        lambda p: p["annotation"]["result"][0]["value"].update(rle="abc"),
        lambda p: p["annotation"]["result"][0]["value"].update(format="png"),
    ],
)
def test_bad_field_types_are_4xx(receiver: tuple[str, MemorySink], mutate: Any) -> None:
    url, sink = receiver
    payload = annotation_payload(1, 1, T0, mask=make_mask(1, 0))
    mutate(payload)
    response = post(url, payload)
    assert 400 <= response.status_code < 500, response.text
    assert sink.rows == {}


def test_non_object_payload_is_400(receiver: tuple[str, MemorySink]) -> None:
    url, sink = receiver
    for payload in ([1, 2], "text", 3, None):
        assert post(url, payload).status_code == 400
    assert sink.rows == {}


def test_wrong_size_mask_is_422(receiver: tuple[str, MemorySink]) -> None:
    url, sink = receiver
    payload = annotation_payload(1, 1, T0, mask=make_mask(2, 0))  # image 2's size on image 1
    response = post(url, payload)
    assert response.status_code == 422
    assert "but the image is 31x20" in response.json()["error"]
    assert sink.rows == {}


def test_transposed_mask_is_422(receiver: tuple[str, MemorySink]) -> None:
    url, sink = receiver
    payload = annotation_payload(1, 1, T0, mask=np.ones((31, 20), dtype=bool))
    assert post(url, payload).status_code == 422
    assert sink.rows == {}


def test_rle_lying_about_its_size_is_422(receiver: tuple[str, MemorySink]) -> None:
    url, sink = receiver
    payload = annotation_payload(1, 1, T0, mask=make_mask(1, 0))
    payload["annotation"]["result"][0]["value"]["rle"] = brush_result(make_mask(2, 0), "d", "i", "d")["value"]["rle"]
    assert post(url, payload).status_code == 422
    assert sink.rows == {}


def test_unknown_image_is_404(receiver: tuple[str, MemorySink]) -> None:
    url, sink = receiver
    response = post(url, annotation_payload(1, 99, T0, verdict="normal"))
    assert response.status_code == 404
    assert sink.rows == {}


def test_unknown_route_and_method(receiver: tuple[str, MemorySink]) -> None:
    url, _ = receiver
    assert requests.post(f"{url}/other", data=b"{}", timeout=5).status_code == 404
    assert requests.get(f"{url}/webhook", timeout=5).status_code == 404
    assert requests.put(f"{url}/webhook", data=b"{}", timeout=5).status_code == 405
    assert requests.get(f"{url}/health", timeout=5).json() == {"status": "ok"}


def test_body_over_the_cap_is_413(tmp_path: Path) -> None:
    sink = MemorySink(SIZES)
    server = make_webhook_server("127.0.0.1", 0, sink, SECRET, max_body=1000)
    serve_in_thread(server)
    try:
        response = post(server.url, None, raw=b" " * 5000)
        assert response.status_code == 413
    finally:
        server.shutdown()
        server.server_close()


def test_chunked_body_without_length_is_411(receiver: tuple[str, MemorySink]) -> None:
    url, sink = receiver
    body = iter([json.dumps(annotation_payload(1, 1, T0, verdict="normal")).encode()])
    response = requests.post(f"{url}/webhook", data=body, timeout=10,
                             headers={"Content-Type": "application/json", "X-DMAD-Secret": SECRET})
    assert response.status_code == 411
    assert sink.rows == {}


# -- kinds, idempotence, ordering ------------------------------------------------------------------
def test_kinds(receiver: tuple[str, MemorySink]) -> None:
    url, sink = receiver
    mask = make_mask(1, 3)
    assert post(url, annotation_payload(1, 1, T0, mask=mask)).json()["outcome"] == "created"
    assert post(url, annotation_payload(2, 1, T0, verdict="normal")).status_code == 200
    assert post(url, annotation_payload(3, 1, T0, verdict="defect")).status_code == 200
    assert post(url, annotation_payload(4, 2, T0, mask=make_mask(2, 1), verdict="defect")).status_code == 200
    assert post(url, annotation_payload(5, 2, T0, mask=make_mask(2, 1), verdict="normal")).status_code == 200
    empty = post(url, annotation_payload(6, 1, T0))
    assert empty.status_code == 200 and empty.json()["outcome"] == "ignored_empty"
    assert {k: v.kind for k, v in sink.rows.items()} == {
        "1": "defect_mask", "2": "normal", "3": "defect_no_mask", "4": "defect_mask", "5": "normal",
    }
    assert np.array_equal(sink.rows["1"].mask, mask)
    assert sink.rows["2"].mask is None and sink.rows["5"].mask is None


def test_duplicate_delivery_is_stored_once(receiver: tuple[str, MemorySink]) -> None:
    url, sink = receiver
    payload = annotation_payload(7, 1, T0, mask=make_mask(1, 5))
    outcomes = [post(url, payload).json()["outcome"] for _ in range(3)]
    assert outcomes == ["created", "unchanged", "unchanged"]
    assert list(sink.rows) == ["7"]


def test_older_delivery_after_newer_does_not_overwrite(receiver: tuple[str, MemorySink]) -> None:
    url, sink = receiver
    newer = make_mask(1, 8)
    older = make_mask(1, 9)
    later = T0 + timedelta(seconds=5)
    assert post(url, annotation_payload(8, 1, later, mask=newer, action="ANNOTATION_UPDATED")).status_code == 200
    response = post(url, annotation_payload(8, 1, T0, mask=older))
    assert response.status_code == 200 and response.json()["outcome"] == "unchanged"
    assert np.array_equal(sink.rows["8"].mask, newer)
    assert sink.rows["8"].updated_at == later
    evenlater = post(url, annotation_payload(8, 1, later + timedelta(seconds=1), verdict="normal",
                                             action="ANNOTATION_UPDATED"))
    assert evenlater.json()["outcome"] == "updated" and sink.rows["8"].kind == "normal"


def test_delete(receiver: tuple[str, MemorySink]) -> None:
    url, sink = receiver
    post(url, annotation_payload(9, 1, T0, verdict="normal"))
    response = post(url, {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 9}, {"id": 12345}]})
    assert response.status_code == 200 and response.json()["deleted"] == 1
    assert sink.rows == {}
    assert post(url, {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": "x"}]}).status_code == 400
    assert post(url, {"action": "ANNOTATIONS_DELETED", "annotations": {"id": 1}}).status_code == 400


def test_bulk_created_pairs_annotations_with_their_tasks(receiver: tuple[str, MemorySink]) -> None:
    url, sink = receiver
    a = annotation_payload(10, 1, T0, mask=make_mask(1, 1))
    b = annotation_payload(11, 2, T0, mask=make_mask(2, 2))
    bulk = {"action": "ANNOTATIONS_CREATED", "annotation": [a["annotation"], b["annotation"]],
            "task": [b["task"], a["task"]]}
    response = post(url, bulk)
    assert response.status_code == 200, response.text
    assert sink.rows["10"].image_id == 1 and sink.rows["11"].image_id == 2
    assert np.array_equal(sink.rows["11"].mask, make_mask(2, 2))


def test_bulk_with_one_bad_item_stores_nothing(receiver: tuple[str, MemorySink]) -> None:
    url, sink = receiver
    a = annotation_payload(12, 1, T0, mask=make_mask(1, 1))
    b = annotation_payload(13, 2, T0, mask=make_mask(1, 2))  # wrong size for image 2
    bulk = {"action": "ANNOTATIONS_CREATED", "annotation": [a["annotation"], b["annotation"]],
            "task": [a["task"], b["task"]]}
    assert post(url, bulk).status_code == 422
    assert sink.rows == {}


def test_other_actions_are_ignored(receiver: tuple[str, MemorySink]) -> None:
    url, sink = receiver
    response = post(url, {"action": "PROJECT_UPDATED", "project": {"id": 1}})
    assert response.status_code == 200 and response.json()["outcome"] == "ignored"
    assert sink.calls == 0


def test_skipped_task_is_ignored(receiver: tuple[str, MemorySink]) -> None:
    url, sink = receiver
    payload = annotation_payload(14, 1, T0, verdict="defect")
    payload["annotation"]["was_cancelled"] = True
    assert post(url, payload).json()["outcome"] == "ignored_empty"
    assert sink.rows == {}


def test_sink_failure_is_500_and_logged(receiver: tuple[str, MemorySink], caplog: Any) -> None:
    url, sink = receiver

    def boom(**_: Any) -> str:
        raise RuntimeError("disk on fire")

    sink.record = boom  # type: ignore[method-assign]
    response = post(url, annotation_payload(15, 1, T0, verdict="normal"))
    assert response.status_code == 500
    assert "disk on fire" not in response.text  # no internals to the client
    assert any("webhook delivery failed" in r.getMessage() for r in caplog.records)


# -- images -----------------------------------------------------------------------------------------
def test_images_are_served_by_content_hash_only(receiver: tuple[str, MemorySink]) -> None:
    url, _ = receiver
    ok = requests.get(f"{url}/images/{'ab' * 32}", timeout=5)
    assert ok.status_code == 200 and ok.content == b"\x89PNG fake"
    assert ok.headers["Content-Type"] == "image/png"
    assert ok.headers["Access-Control-Allow-Origin"] == "*"  # the labelling UI loads it crossOrigin
    assert requests.get(f"{url}/images/{'cd' * 32}", timeout=5).status_code == 404
    for bad in ("../../etc/passwd", "%2e%2e%2fetc%2fpasswd", "AB" * 32, "ab" * 32 + "/x"):
        assert requests.get(f"{url}/images/{bad}", timeout=5).status_code == 404


# -- the shared parser ------------------------------------------------------------------------------
def test_parse_accepts_sdk_shaped_values() -> None:
    """The sync hands over SDK models dumped to dicts: datetimes instead of text."""
    payload = annotation_payload(16, 1, T0, mask=make_mask(1, 4))
    payload["annotation"]["updated_at"] = T0.replace(tzinfo=None)  # naive means UTC
    parsed = parse_annotation(payload["annotation"], payload["task"], image_size=(20, 31))
    assert parsed.kind == "defect_mask" and parsed.updated_at == T0 and parsed.external_id == "16"


def test_parse_reports_status_codes() -> None:
    payload = annotation_payload(17, 1, T0, mask=make_mask(1, 4))
    with pytest.raises(PayloadError) as info:
        parse_annotation(payload["annotation"], payload["task"], image_size=(21, 31))
    assert info.value.status == 422
    with pytest.raises(PayloadError) as info:
        parse_annotation({"result": []}, payload["task"])
    assert info.value.status == 400
