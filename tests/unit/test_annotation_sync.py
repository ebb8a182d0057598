"""The sync against a stand-in for the SDK client (the real server is in the integration tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import numpy as np

from annotation.rle import brush_result
from annotation.sink import MemorySink
from annotation.sync import sync_annotations

T0 = datetime(2026, 3, 1, tzinfo=UTC)
SIZES = {1: (12, 19), 2: (8, 5)}


@dataclass
class _Tasks:
    tasks: list[dict[str, Any]]

    def list(self, *, project: int, fields: str = "all", page: int = 1, page_size: int = 100) -> SimpleNamespace:
        """One page, shaped like the SDK's pager (``items``, ``response.total``)."""
        assert fields == "all"
        found = [t for t in self.tasks if t["project"] == project]
        return SimpleNamespace(items=found[(page - 1) * page_size:page * page_size],
                               response=SimpleNamespace(total=len(found)))


@dataclass
class FakeClient:
    """Only what the sync uses: ``tasks.list`` (annotations embedded, as Label Studio 1.23 returns them)."""

    task_list: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tasks(self) -> _Tasks:
        return _Tasks(self.task_list)

    def add(self, task_id: int, image_id: int, *annotations: dict[str, Any]) -> None:
        self.task_list.append({"id": task_id, "project": 7, "data": {"image_id": image_id},
                               "annotations": list(annotations), "total_annotations": len(annotations)})


def ann(ann_id: int, when: datetime, *, mask: np.ndarray | None = None, verdict: str | None = None,
        cancelled: bool = False) -> dict[str, Any]:
    result: list[dict[str, Any]] = []
    if mask is not None:
        result.append(brush_result(mask, "defect", "image", "defect"))
    if verdict is not None:
        result.append({"type": "choices", "from_name": "verdict", "to_name": "image",
                       "value": {"choices": [verdict]}})
    return {"id": ann_id, "updated_at": when, "result": result, "was_cancelled": cancelled}


def test_sync_creates_updates_deletes_and_reports_failures() -> None:
    mask = np.zeros(SIZES[1], dtype=bool)
    mask[2:5, 3:11] = True
    client = FakeClient()
    client.add(1, 1, ann(101, T0, mask=mask), ann(102, T0, verdict="normal"))
    client.add(2, 2, ann(103, T0, verdict="defect"), ann(104, T0))  # 104: empty
    client.add(3, 99, ann(105, T0, verdict="normal"))  # unknown image
    client.add(4, 2, ann(106, T0, mask=mask))  # wrong size
    sink = MemorySink(SIZES)

    report = sync_annotations(client, 7, sink)  # type: ignore[arg-type]
    assert (report.created, report.updated, report.unchanged, report.deleted) == (3, 0, 0, 0)
    assert len(report.failed) == 2
    assert any("image 99" in line for line in report.failed)
    assert any("annotation 106" in line and "but the image is 5x8" in line for line in report.failed)
    assert np.array_equal(sink.rows["101"].mask, mask)
    assert {k: v.kind for k, v in sink.rows.items()} == {
        "101": "defect_mask", "102": "normal", "103": "defect_no_mask"}

    again = sync_annotations(client, 7, sink)  # type: ignore[arg-type]
    assert (again.created, again.updated, again.unchanged, again.deleted) == (0, 0, 3, 0)

    # 102 changed, 103 deleted in Label Studio, 101 emptied by a skip
    client.task_list.clear()
    client.add(1, 1, ann(101, T0 + timedelta(1), cancelled=True), ann(102, T0 + timedelta(1), verdict="defect"))
    third = sync_annotations(client, 7, sink)  # type: ignore[arg-type]
    assert (third.created, third.updated, third.unchanged, third.deleted) == (0, 1, 0, 2)
    assert {k: v.kind for k, v in sink.rows.items()} == {"102": "defect_no_mask"}


def test_a_failing_annotation_is_kept_not_deleted() -> None:
    sink = MemorySink(SIZES)
    client = FakeClient()
    client.add(1, 1, ann(201, T0, verdict="normal"))
    sync_annotations(client, 7, sink)  # type: ignore[arg-type]
    client.task_list[0]["annotations"][0]["updated_at"] = "garbage"
    report = sync_annotations(client, 7, sink)  # type: ignore[arg-type]
    assert report.deleted == 0 and len(report.failed) == 1
    assert set(sink.rows) == {"201"}


def test_other_projects_are_not_touched() -> None:
    sink = MemorySink(SIZES)
    client = FakeClient()
    client.add(1, 1, ann(301, T0, verdict="normal"))
    client.task_list[0]["project"] = 8
    report = sync_annotations(client, 7, sink)  # type: ignore[arg-type]
    assert report.created == 0 and sink.rows == {}
