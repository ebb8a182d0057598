"""Fuzzing the receiver: thousands of hostile, broken, duplicated and reordered requests.

Asserted: no answer is ever a 5xx (nor a dropped connection for a request that was sent whole), each
kind of bad request gets its own 4xx, and the sink ends in exactly the state the valid, authenticated
deliveries describe: for every annotation the newest version, nothing from a rejected request, no
duplicates, and no row that is only partly valid.
"""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import requests

from annotation.sink import MemorySink
from annotation.webhook import make_webhook_server, serve_in_thread
from tests.unit.test_annotation_webhook import SECRET, SIZES, T0, annotation_payload, make_mask

N_TRACKED = 30  # annotation ids 1..30: several versions each, delivered shuffled and duplicated
N_VERSIONS = 3
DELETED = range(200, 210)  # created, then deleted at the end
MUTANT_IDS = range(1000, 1400)  # mutated payloads: may or may not be valid, must never leave a bad row
RLE_MUTANT_IDS = range(1400, 1500)  # masks with a damaged RLE: valid JSON, so 200 or 422
MAX_BODY = 2 * 1024 * 1024  # a smaller cap than production so oversized bodies stay cheap to send


@dataclass
class Request:
    label: str
    body: bytes | None  # None: raw socket request in `raw`
    headers: dict[str, str]
    expect: Callable[[int], bool]
    raw: bytes | None = None
    method: str = "POST"
    path: str = "/webhook"


def _version(ann_id: int, version: int) -> dict[str, Any]:
    """Version `version` of tracked annotation `ann_id`: kinds and masks change between versions."""
    image_id = 1 + ann_id % 2
    moment = T0 + timedelta(minutes=version)
    kind = (ann_id + version) % 3
    action = "ANNOTATION_CREATED" if version == 0 else "ANNOTATION_UPDATED"
    if kind == 0:
        return annotation_payload(ann_id, image_id, moment, mask=make_mask(image_id, ann_id * 10 + version),
                                  action=action)
    if kind == 1:
        return annotation_payload(ann_id, image_id, moment, verdict="normal", action=action)
    return annotation_payload(ann_id, image_id, moment, verdict="defect", action=action)


def _expected(payload: dict[str, Any]) -> tuple[int, str]:
    """(image id, kind) that a version made by `_version` must be stored as."""
    result = payload["annotation"]["result"]
    image_id = payload["task"]["data"]["image_id"]
    if result[0]["type"] == "brushlabels":
        return image_id, "defect_mask"
    verdict = result[0]["value"]["choices"][0]
    return image_id, "normal" if verdict == "normal" else "defect_no_mask"


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(8 if depth < 4 else 5)
    if choice == 0:
        return rng.randint(-(2**70), 2**70)
    if choice == 1:
        return rng.random() * 10**rng.randint(-5, 300)
    if choice == 2:
        return "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 20)))
    if choice == 3:
        return rng.choice([None, True, False])
    if choice == 4:
        return rng.choice(["ANNOTATION_CREATED", "ANNOTATIONS_DELETED", "ANNOTATIONS_CREATED", "x"])
    if choice == 5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    keys = ["action", "annotation", "task", "annotations", "id", "result", "data", "image_id", "updated_at",
            "value", "rle", "type", "choices", "original_width", "original_height", "from_name"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 6))}


def _mutate(rng: random.Random, payload: Any) -> Any:
    """Replaces, deletes or retypes one random node of a valid payload."""
    payload = json.loads(json.dumps(payload))
    node = payload
    for _ in range(rng.randint(1, 6)):
        if isinstance(node, dict) and node:
            key = rng.choice(list(node))
            if rng.random() < 0.3 or not isinstance(node[key], (dict, list)):
                action = rng.randrange(3)
                if action == 0:
                    del node[key]
                elif action == 1:
                    node[key] = _random_json(rng, 3)
                else:
                    node[key] = str(node[key])
                return payload
            node = node[key]
        elif isinstance(node, list) and node:
            index = rng.randrange(len(node))
            if rng.random() < 0.3 or not isinstance(node[index], (dict, list)):
                node[index] = _random_json(rng, 3)
                return payload
            node = node[index]
        else:
            break
    return payload


def _json_headers(secret: str | None = SECRET, content_type: str = "application/json") -> dict[str, str]:
    headers = {"Content-Type": content_type}
    if secret is not None:
        headers["X-DMAD-Secret"] = secret
    return headers


def _is(*codes: int) -> Callable[[int], bool]:
    return lambda status: status in codes


def _client_error(status: int) -> bool:
    return 400 <= status < 500


def _build_requests(rng: random.Random) -> tuple[list[Request], list[Request], dict[str, dict[str, Any]]]:
    """(shuffled requests, deletions sent at the end, newest valid version per tracked id)."""
    reqs: list[Request] = []
    newest: dict[str, dict[str, Any]] = {}
    for ann_id in range(1, N_TRACKED + 1):
        delivered = sorted(rng.sample(range(N_VERSIONS), rng.randint(1, N_VERSIONS)))
        newest[str(ann_id)] = _version(ann_id, delivered[-1])
        for version in delivered:
            for _ in range(rng.randint(1, 4)):  # duplicates
                body = json.dumps(_version(ann_id, version)).encode()
                reqs.append(Request("valid", body, _json_headers(), _is(200)))
        newer = _version(ann_id, N_VERSIONS + 5)  # newer than anything valid: must never be stored
        body = json.dumps(newer).encode()
        reqs.append(Request("no secret", body, _json_headers(None), _is(401)))
        reqs.append(Request("wrong secret", body, _json_headers("nope"), _is(403)))
        reqs.append(Request("text/plain", body, _json_headers(content_type="text/plain"), _is(415)))
        reqs.append(Request("truncated", body[: rng.randrange(1, len(body) - 1)], _json_headers(), _is(400)))
        wrong = json.loads(body)
        other = 2 if wrong["task"]["data"]["image_id"] == 1 else 1
        wrong["annotation"]["result"] = [
            {"type": "brushlabels", "from_name": "defect", "to_name": "image",
             "original_width": SIZES[other][1], "original_height": SIZES[other][0], "image_rotation": 0,
             "value": {"format": "rle", "rle": _rle(other), "brushlabels": ["defect"]}}]
        reqs.append(Request("wrong size", json.dumps(wrong).encode(), _json_headers(), _is(422)))
        unknown = json.loads(body)
        unknown["task"]["data"]["image_id"] = 10_000 + ann_id
        reqs.append(Request("unknown image", json.dumps(unknown).encode(), _json_headers(), _is(404)))
    for ann_id in DELETED:
        body = json.dumps(_version(ann_id, 0)).encode()
        reqs.append(Request("valid (deleted later)", body, _json_headers(), _is(200)))
    for ann_id in MUTANT_IDS:
        base = _version(ann_id, rng.randrange(N_VERSIONS))
        reqs.append(Request("mutant", json.dumps(_mutate(rng, base)).encode(), _json_headers(),
                            lambda s: s == 200 or _client_error(s)))
    for ann_id in RLE_MUTANT_IDS:
        image_id = 1 + ann_id % 2
        payload = annotation_payload(ann_id, image_id, T0, mask=make_mask(image_id, ann_id))
        value = payload["annotation"]["result"][0]["value"]
        value["rle"] = _damage_rle(rng, value["rle"])
        reqs.append(Request("rle mutant", json.dumps(payload).encode(), _json_headers(), _is(200, 422)))
    for _ in range(250):
        body = json.dumps(_random_json(rng)).encode()
        reqs.append(Request("random json", body, _json_headers(), lambda s: s == 200 or _client_error(s)))
    for _ in range(120):
        garbage = bytes(rng.randrange(256) for _ in range(rng.randint(1, 400)))
        reqs.append(Request("garbage", garbage, _json_headers(), _is(400)))
    for depth in (1000, 50_000):
        reqs.append(Request("deep", b"[" * depth + b"]" * depth, _json_headers(), _is(400)))
    for _ in range(4):
        reqs.append(Request("huge", b"{" + b" " * (MAX_BODY + 10) + b"}", _json_headers(), _is(413)))
        reqs.append(Request("huge unauthenticated", b" " * (MAX_BODY + 10), _json_headers(None), _is(401)))
    for content_type in ("application/x-www-form-urlencoded", "multipart/form-data", "", "application/jsonx"):
        body = json.dumps(_version(1, N_VERSIONS + 6)).encode()
        reqs.append(Request("content type", body, _json_headers(content_type=content_type), _is(415)))
    for _ in range(20):
        reqs.append(Request("wrong path", b"{}", _json_headers(), _is(404), path="/hook"))
        reqs.append(Request("GET", None, {}, _is(404), method="GET", path="/webhook"))
        reqs.append(Request("short body", None, {}, _is(400), raw=_short_body_request()))
        reqs.append(Request("no length", None, {}, _is(411), raw=_no_length_request()))
    rng.shuffle(reqs)
    deletions = [Request("delete", json.dumps({"action": "ANNOTATIONS_DELETED",
                                               "annotations": [{"id": i} for i in DELETED]}).encode(),
                         _json_headers(), _is(200))]
    return reqs, deletions, newest


def _damage_rle(rng: random.Random, rle: list[int]) -> list[int]:
    rle = list(rle)
    how = rng.randrange(5)
    if how == 0:
        return rle[: rng.randrange(len(rle))]
    if how == 1:
        rle[rng.randrange(4)] = rng.randrange(256)  # the declared length
    elif how == 2:
        for _ in range(rng.randint(1, 5)):
            rle[rng.randrange(len(rle))] = rng.randrange(256)
    elif how == 3:
        rle += [rng.randrange(256) for _ in range(rng.randint(1, 50))]
    else:
        rle = rle[:5] + [255] * rng.randint(1, 2000)
    return rle


def _rle(image_id: int) -> list[int]:
    from annotation.rle import mask_to_rle

    return mask_to_rle(make_mask(image_id, 0))


def _short_body_request() -> bytes:
    return (b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"X-DMAD-Secret: {SECRET}\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"action": "A')


def _no_length_request() -> bytes:
    return (b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"X-DMAD-Secret: {SECRET}\r\n\r\n".encode() + b"{}")


def _send(url: str, req: Request) -> int:
    if req.raw is not None:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(req.raw)
            if req.label != "short body":  # that client stalls mid-body (one that hangs up has gone: no answer)
                sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return int(data.split(b" ", 2)[1])
    response = requests.request(req.method, url + req.path, data=req.body, headers=req.headers, timeout=30)
    if response.status_code >= 400:
        assert "error" in response.json()
    return response.status_code


@pytest.mark.slow
def test_fuzz_receiver_never_fails_and_keeps_a_consistent_state() -> None:
    rng = random.Random(20260101)
    sink = MemorySink(SIZES)
    server = make_webhook_server("127.0.0.1", 0, sink, SECRET, max_body=MAX_BODY, read_timeout=1.0)
    serve_in_thread(server)
    try:
        requests_, deletions, newest = _build_requests(rng)
        assert len(requests_) >= 1000
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(lambda r: _send(server.url, r), requests_))
        statuses += [_send(server.url, r) for r in deletions]
    finally:
        server.shutdown()
        server.server_close()

    everything = requests_ + deletions
    assert all(status < 500 for status in statuses), [
        (r.label, s) for r, s in zip(everything, statuses) if s >= 500]
    unexpected = [(r.label, s) for r, s in zip(everything, statuses) if not r.expect(s)]
    assert unexpected == []

    # tracked ids: exactly the newest valid version; nothing from rejected requests
    for ann_id, payload in newest.items():
        row = sink.rows[ann_id]
        image_id, kind = _expected(payload)
        assert (row.image_id, row.kind) == (image_id, kind), ann_id
        assert row.updated_at == T0 + timedelta(minutes=_version_of(payload))
        if kind == "defect_mask":
            version = _version_of(payload)
            assert np.array_equal(row.mask, make_mask(image_id, int(ann_id) * 10 + version))
        else:
            assert row.mask is None
    # deleted ids are gone; only tracked and mutant ids can exist; mutant rows are whole
    assert not set(map(str, DELETED)) & set(sink.rows)
    allowed = set(newest) | set(map(str, MUTANT_IDS)) | set(map(str, RLE_MUTANT_IDS))
    assert set(sink.rows) <= allowed, set(sink.rows) - allowed
    for ann_id, row in sink.rows.items():
        assert row.image_id in SIZES
        assert row.kind in ("defect_mask", "normal", "defect_no_mask")
        if row.kind == "defect_mask":
            assert row.mask is not None and row.mask.shape == SIZES[row.image_id] and row.mask.any()
        else:
            assert row.mask is None


def _version_of(payload: dict[str, Any]) -> int:
    from annotation.parse import parse_time

    return int((parse_time(payload["annotation"]["updated_at"]) - T0).total_seconds() // 60)
