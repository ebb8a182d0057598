"""Where parsed annotations go: the receiver and the sync only talk to an :class:`AnnotationSink`.

The protocol keeps the receiver free of the database and lets it be tested against
:class:`MemorySink`, which has the same semantics as the database sink the app plugs in
(``app.services.labelstudio.sink.DatabaseSink``):

* ``record`` is idempotent on (external id, updated time): the same delivery twice stores one row, and
  an older version arriving after a newer one does not overwrite it (both ``"unchanged"``); otherwise
  ``"created"`` or ``"updated"``. A deleted annotation stays deleted unless a *newer* version arrives.
* ``delete`` forgets an external id; True when there was something to forget.
* ``image_size`` is (height, width) of a known image, None for an unknown one.
* ``known_external_ids`` lists what is stored (not deleted) from Label Studio; the sync deletes those
  Label Studio no longer has.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import numpy as np

OUTCOMES: tuple[str, ...] = ("created", "updated", "unchanged")
SOURCE = "labelstudio"


class AnnotationSink(Protocol):
    def record(self, *, image_id: int, kind: str, mask: np.ndarray | None, external_id: str,
               updated_at: datetime) -> str:
        """Stores one annotation; returns one of OUTCOMES."""
        ...

    def delete(self, *, external_id: str) -> bool: ...

    def image_size(self, image_id: int) -> tuple[int, int] | None: ...

    def known_external_ids(self) -> set[str]: ...


class UnknownImageError(LookupError):
    """The annotation names an image we do not have (the receiver answers 404)."""


@dataclass(frozen=True)
class StoredAnnotation:
    image_id: int
    kind: str
    mask: np.ndarray | None
    updated_at: datetime


class MemorySink:
    """An in-memory sink with the semantics of the protocol (tests, demos). Thread-safe."""

    def __init__(self, image_sizes: dict[int, tuple[int, int]] | None = None) -> None:
        self.image_sizes: dict[int, tuple[int, int]] = dict(image_sizes or {})
        self.rows: dict[str, StoredAnnotation] = {}
        self.deleted: dict[str, datetime] = {}  # tombstones: external id -> updated time when deleted
        self.calls = 0  # record/delete calls that reached the sink
        self._lock = threading.Lock()

    def record(self, *, image_id: int, kind: str, mask: np.ndarray | None, external_id: str,
               updated_at: datetime) -> str:
        with self._lock:
            self.calls += 1
            size = self.image_sizes.get(image_id)
            if size is None:
                raise UnknownImageError(f"image {image_id} is not known")
            if (mask is None) != (kind != "defect_mask"):
                raise ValueError(f"a {kind!r} annotation {'takes no' if mask is not None else 'needs a'} mask")
            if mask is not None and mask.shape != size:
                raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {size[1]}x{size[0]}")
            old = self.rows.get(external_id)
            tombstone = self.deleted.get(external_id)
            if old is not None and old.updated_at >= updated_at:
                return "unchanged"
            if tombstone is not None and tombstone >= updated_at:
                return "unchanged"
            self.rows[external_id] = StoredAnnotation(
                image_id=image_id, kind=kind, mask=None if mask is None else mask.copy(), updated_at=updated_at
            )
            self.deleted.pop(external_id, None)
            return "created" if old is None and tombstone is None else "updated"

    def delete(self, *, external_id: str) -> bool:
        with self._lock:
            self.calls += 1
            old = self.rows.pop(external_id, None)
            if old is None:
                return False
            self.deleted[external_id] = old.updated_at
            return True

    def image_size(self, image_id: int) -> tuple[int, int] | None:
        return self.image_sizes.get(image_id)

    def known_external_ids(self) -> set[str]:
        with self._lock:
            return set(self.rows)
