"""The receiver's fuzz, on the real database: `DatabaseSink` on a SQLite file, not a dict.

The requests are those of ``test_annotation_webhook_fuzz`` (its generators, reused), plus deletions
mixed in among them and duplicates delivered at the same moment from several threads. Deliveries run
on a pool of threads in a shuffled order; a step that must follow others (a deletion after the
creations it deletes, a redelivery after that deletion) waits for them, and every other step runs
concurrently with it. The final state is therefore fixed, and it is checked row by row:

* no answer is a 5xx, and each request gets the answer its kind calls for;
* a rejected request stored nothing; exactly one row per (source, external id);
* each live row is the newest delivered version by updated time, each deleted one stays deleted
  unless a newer version arrived after its deletion;
* every mask file exists, has its image's size and holds the delivered mask; no stray files;
* the retrain jobs coalesced into one waiting job.

Response times are recorded and printed (``-s``), never asserted.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import requests
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from annotation.sink import MemorySink
from annotation.webhook import DELETE_ACTIONS, RECORD_ACTIONS, handle_payload, make_webhook_server, serve_in_thread
from app.home_folder import Home
from app.services.labelstudio.sink import DatabaseSink
from app.services.loop.annotations import load_mask, mask_file
from db.models import Annotation, Image, Job
from tests.db_fixtures import add_test_image, home, sqlite_engine, sqlite_sf, sqlite_url  # noqa: F401
from tests.unit.test_annotation_webhook import SECRET, SIZES, T0, make_mask
from tests.unit.test_annotation_webhook_fuzz import (
    DELETED,
    MAX_BODY,
    N_VERSIONS,
    Request,
    _build_requests,
    _expected,
    _is,
    _json_headers,
    _send,
    _version,
    _version_of,
)

BURST_NEW = range(3000, 3020)  # first delivered as a burst of identical copies at once
LIFECYCLE = range(4000, 4030)  # created, deleted in the middle of the traffic, then (maybe) redelivered
REVIVED_VERSION = N_VERSIONS + 1  # delivered after the deletion: newer, so the annotation comes back
WORKERS = 8
WAIT_S = 120  # a step waits at most this long for the steps it follows


@dataclass(eq=False)
class Step:
    """One request, delivered `copies` times at once (a barrier releases the copies together)."""

    request: Request
    at: float  # place in the delivery order
    copies: int = 1
    after: list[Step] = field(default_factory=list)  # delivered only once these are answered
    done: threading.Event = field(default_factory=threading.Event)
    answers: list[tuple[int, dict[str, Any] | None, float]] = field(default_factory=list)  # status, body, s


@dataclass
class Lifecycle:
    pre: list[int]  # versions delivered before the deletion
    fate: str  # "deleted", "stale redelivery" (an old version after the deletion) or "revived"
    delete: Step
    post: Step | None


def _delete_body(*ids: int | str) -> bytes:
    return json.dumps({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": i} for i in ids]}).encode()


def _valid(ann_id: int, version: int, label: str) -> Request:
    return Request(label, json.dumps(_version(ann_id, version)).encode(), _json_headers(), _is(200))


def _after(rng: random.Random, steps: list[Step], spread: float = 0.4) -> float:
    return max(s.at for s in steps) + 1e-6 + rng.random() * spread


def _plan(rng: random.Random) -> tuple[list[Step], dict[str, dict[str, Any]], dict[int, Lifecycle], Step, list[Step]]:
    """(steps in delivery order, newest version per tracked id, lifecycles, the generator's deletion,
    the bursts of new ids)."""
    reqs, deletions, newest = _build_requests(rng)
    steps = [Step(r, rng.random()) for r in reqs]

    # the generator's deletion of DELETED, moved into the traffic: after their creations, which come early
    creations = [s for s in steps if s.request.label == "valid (deleted later)"]
    for s in creations:
        s.at = rng.uniform(0.0, 0.3)
    (deletion_request,) = deletions
    generator_delete = Step(deletion_request, _after(rng, creations), after=creations)
    steps.append(generator_delete)

    # duplicates at once: the newest version of each tracked id, several copies released together
    for ann_id_text, payload in newest.items():
        body = json.dumps(payload).encode()
        steps.append(Step(Request("burst", body, _json_headers(), _is(200)), rng.random(),
                          copies=rng.randint(3, 6)))
        # deletions of live annotations that must be refused, and so delete nothing
        ann_id = int(ann_id_text)
        body = _delete_body(ann_id)
        refused = [
            Request("delete without secret", body, _json_headers(None), _is(401)),
            Request("delete with wrong secret", body, _json_headers("nope"), _is(403)),
            Request("delete as text/plain", body, _json_headers(content_type="text/plain"), _is(415)),
            Request("delete truncated", body[: rng.randrange(1, len(body) - 1)], _json_headers(), _is(400)),
            Request("delete with one bad id", _delete_body(ann_id, "x"), _json_headers(), _is(400)),
        ]
        for request in rng.sample(refused, 2):
            steps.append(Step(request, rng.random()))

    bursts = []
    for ann_id in BURST_NEW:
        bursts.append(Step(_valid(ann_id, 0, "burst of a new id"), rng.random(), copies=rng.randint(3, 6)))
    steps += bursts

    lifecycles: dict[int, Lifecycle] = {}
    for ann_id in LIFECYCLE:
        fate = ("deleted", "stale redelivery", "revived")[ann_id % 3]
        pre_versions = sorted(rng.sample(range(N_VERSIONS), rng.randint(1, N_VERSIONS)))
        pre = [Step(_valid(ann_id, v, "before its deletion"), rng.uniform(0.0, 0.5), copies=rng.choice((1, 1, 3)))
               for v in pre_versions for _ in range(rng.randint(1, 2))]
        delete = Step(Request("deletion", _delete_body(ann_id), _json_headers(), _is(200)), _after(rng, pre),
                      copies=rng.choice((1, 1, 3)), after=pre)
        post = None
        if fate == "stale redelivery":
            post = Step(_valid(ann_id, rng.choice(pre_versions), "stale after its deletion"),
                        _after(rng, [delete], 0.3), copies=rng.choice((1, 3)), after=[delete])
        elif fate == "revived":
            post = Step(_valid(ann_id, REVIVED_VERSION, "newer after its deletion"), _after(rng, [delete], 0.3),
                        copies=rng.choice((1, 3)), after=[delete])
        steps += pre + [delete] + ([post] if post else [])
        lifecycles[ann_id] = Lifecycle(pre_versions, fate, delete, post)

    for _ in range(10):  # deletions of ids never stored
        steps.append(Step(Request("delete unknown id", _delete_body(rng.randint(900_000, 999_999)), _json_headers(),
                                  _is(200)), rng.random()))

    # a step always comes after the steps it waits for, so a FIFO pool never waits on work it has not started
    steps.sort(key=lambda s: s.at)
    position = {id(s): i for i, s in enumerate(steps)}
    assert all(position[id(d)] < position[id(s)] for s in steps for d in s.after)
    return steps, newest, lifecycles, generator_delete, bursts


def _deliver(url: str, request: Request) -> tuple[int, dict[str, Any] | None, float]:
    started = time.perf_counter()
    if request.raw is not None:
        status = _send(url, request)
        return status, None, time.perf_counter() - started
    response = requests.request(request.method, url + request.path, data=request.body, headers=request.headers,
                                timeout=30)
    elapsed = time.perf_counter() - started
    body = response.json()
    if response.status_code >= 400:
        assert "error" in body
    return response.status_code, body, elapsed


def _run(url: str, step: Step) -> None:
    try:
        for dependency in step.after:
            assert dependency.done.wait(WAIT_S), f"{step.request.label}: a step it follows never finished"
        if step.copies == 1:
            step.answers.append(_deliver(url, step.request))
            return
        barrier = threading.Barrier(step.copies)

        def copy(_: int) -> tuple[int, dict[str, Any] | None, float]:
            barrier.wait(WAIT_S)
            return _deliver(url, step.request)

        with ThreadPoolExecutor(max_workers=step.copies) as burst:
            step.answers.extend(burst.map(copy, range(step.copies)))
    finally:
        step.done.set()


def _payload(request: Request) -> Any:
    if request.body is None:
        return None
    try:
        return json.loads(request.body)
    except (ValueError, RecursionError):
        return None


def _mentioned_ids(payload: Any) -> set[str]:
    """External ids a payload names (annotation ids of a record, or of a deletion)."""
    if not isinstance(payload, dict):
        return set()
    items = payload.get("annotation")
    items = items if isinstance(items, list) else [items]
    if isinstance(payload.get("annotations"), list):
        items += payload["annotations"]
    return {str(item["id"]) for item in items if isinstance(item, dict) and isinstance(item.get("id"), (int, str))}


def _reference(steps: list[Step]) -> MemorySink:
    """The accepted deliveries replayed, in delivery order, into the in-memory sink that has the
    protocol's semantics: the state the database must end in."""
    reference = MemorySink(SIZES)
    for step in steps:
        payload = _payload(step.request)
        for status, _body, _s in step.answers:
            if status == 200 and isinstance(payload, dict) and payload.get("action") in RECORD_ACTIONS + DELETE_ACTIONS:
                handle_payload(payload, reference)
    return reference


def _content(ann_id: int, version: int) -> tuple[int, str, np.ndarray | None]:
    """(image id, kind, mask) of `_version(ann_id, version)`."""
    image_id, kind = _expected(_version(ann_id, version))
    return image_id, kind, make_mask(image_id, ann_id * 10 + version) if kind == "defect_mask" else None


@pytest.mark.slow
def test_fuzz_receiver_on_the_database(sqlite_sf: sessionmaker[Session], home: Home,  # noqa: F811
                                       tmp_path: Path) -> None:
    with sqlite_sf() as session:
        for image_id, (height, width) in SIZES.items():
            image = add_test_image(session, tmp_path, f"image{image_id}", width=width, height=height)
            session.flush()
            assert image.id == image_id  # the generators' payloads name images 1 and 2
        session.commit()
    sink = DatabaseSink(home, sqlite_sf)
    steps, newest, lifecycles, generator_delete, bursts = _plan(random.Random(20260101))
    requests_sent = sum(s.copies for s in steps)
    assert requests_sent >= 1000

    server = make_webhook_server("127.0.0.1", 0, sink, SECRET, max_body=MAX_BODY, image_path=sink.image_path,
                                 read_timeout=1.0)
    serve_in_thread(server)
    try:
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            list(pool.map(lambda s: _run(server.url, s), steps))
    finally:
        server.shutdown()
        server.server_close()

    # -- answers ----------------------------------------------------------------------------------
    answers = [(s, status, body, seconds) for s in steps for status, body, seconds in s.answers]
    assert len(answers) == requests_sent
    seconds = np.array([a[3] for a in answers])
    accepted_writes = np.array([a[3] for a in answers if a[1] == 200])
    print(f"\nwebhook fuzz on SQLite: {len(answers)} requests, response time max {seconds.max() * 1000:.1f} ms, "
          f"p99 {np.percentile(seconds, 99) * 1000:.1f} ms, median {np.median(seconds) * 1000:.1f} ms; "
          f"{len(accepted_writes)} accepted: max {accepted_writes.max() * 1000:.1f} ms, "
          f"p99 {np.percentile(accepted_writes, 99) * 1000:.1f} ms")
    assert [(s.request.label, status) for s, status, _, _ in answers if status >= 500] == []
    assert [(s.request.label, status) for s, status, _, _ in answers if not s.request.expect(status)] == []

    # duplicates released together: exactly one copy stores, the others find it stored
    for step in bursts:
        outcomes = sorted(body["outcome"] for _, body, _ in step.answers)
        assert outcomes == ["created"] + ["unchanged"] * (step.copies - 1), outcomes
    # each deletion removed what its creations stored, exactly once however many copies raced
    assert generator_delete.answers[0][1] == {"outcome": "deleted", "deleted": len(DELETED), "received": len(DELETED)}
    for ann_id, life in lifecycles.items():
        assert sum(body["deleted"] for _, body, _ in life.delete.answers) == 1, ann_id
        if life.fate == "stale redelivery":
            assert {body["outcome"] for _, body, _ in life.post.answers} == {"unchanged"}, ann_id
        elif life.fate == "revived":
            outcomes = sorted(body["outcome"] for _, body, _ in life.post.answers)
            assert outcomes == ["unchanged"] * (life.post.copies - 1) + ["updated"], (ann_id, outcomes)

    # -- the database -----------------------------------------------------------------------------
    with sqlite_sf() as session:
        rows = list(session.scalars(select(Annotation)))
        sizes = {i.id: (i.height, i.width) for i in session.scalars(select(Image))}
        jobs = list(session.scalars(select(Job)))
    assert {(r.source, r.external_id is not None) for r in rows} == {("labelstudio", True)}
    ids = [r.external_id for r in rows]
    assert len(ids) == len(set(ids)), "more than one row for an annotation"
    by_id = {r.external_id: r for r in rows}
    live = {k: r for k, r in by_id.items() if r.deleted_at is None}
    gone = {k: r for k, r in by_id.items() if r.deleted_at is not None}

    # tracked ids: the newest delivered version (their rejected requests all carry a newer one)
    for ann_id, payload in newest.items():
        version = _version_of(payload)
        image_id, kind, mask = _content(int(ann_id), version)
        row = live[ann_id]
        assert (row.image_id, row.kind, row.source_updated_at) == (image_id, kind, T0 + timedelta(minutes=version))
        if mask is not None:
            assert np.array_equal(load_mask(row, home), mask), ann_id
    for ann_id in BURST_NEW:
        image_id, kind, _ = _content(ann_id, 0)
        assert (live[str(ann_id)].image_id, live[str(ann_id)].kind) == (image_id, kind)
    # deleted ids stay deleted (soft: the row keeps its last version), unless a newer version came after
    for ann_id in DELETED:
        image_id, kind, mask = _content(ann_id, 0)
        row = gone[str(ann_id)]
        assert (row.image_id, row.kind, row.source_updated_at) == (image_id, kind, T0)
        if mask is not None:
            assert np.array_equal(load_mask(row, home), mask), ann_id
    for ann_id, life in lifecycles.items():
        version = REVIVED_VERSION if life.fate == "revived" else life.pre[-1]
        row = (live if life.fate == "revived" else gone)[str(ann_id)]
        image_id, kind, mask = _content(ann_id, version)
        assert (row.image_id, row.kind, row.source_updated_at) == (image_id, kind, T0 + timedelta(minutes=version))
        if mask is not None:
            assert np.array_equal(load_mask(row, home), mask), ann_id

    # an id named only by rejected requests has no row at all
    accepted_ids = {i for s, status, _, _ in answers if status == 200 for i in _mentioned_ids(_payload(s.request))}
    rejected_ids = {i for s, status, _, _ in answers if status != 200 for i in _mentioned_ids(_payload(s.request))}
    assert rejected_ids - accepted_ids  # the check below has something to check
    assert set(by_id) & (rejected_ids - accepted_ids) == set(), "a rejected request stored a row"

    # every row, mutants included, is what the accepted deliveries describe, and nothing else is stored
    reference = _reference(steps)
    assert set(live) == set(reference.rows)
    assert set(gone) == set(reference.deleted)
    for ann_id, expected in reference.rows.items():
        row = live[ann_id]
        assert (row.image_id, row.kind, row.source_updated_at) == (expected.image_id, expected.kind,
                                                                   expected.updated_at), ann_id
        if expected.mask is not None:
            assert np.array_equal(load_mask(row, home), expected.mask), ann_id

    # mask files: one per mask row, its image's size; no other file (no temporary or backup left over)
    assert {p.name for p in home.masks_dir.iterdir()} == {f"{r.id}.png" for r in rows if r.kind == "defect_mask"}
    for row in rows:
        path = mask_file(home, row.id)
        if row.kind != "defect_mask":
            assert row.mask_path is None and not path.exists()
            continue
        assert row.mask_path == str(path) and path.is_file()
        height, width = sizes[row.image_id]
        with PIL.Image.open(path) as im:
            assert im.size == (width, height)

    # every stored change asked for a retrain; with no worker they all coalesced into one waiting job
    assert [(j.type, j.status) for j in jobs] == [("retrain", "queued")]
