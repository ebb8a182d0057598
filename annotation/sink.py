"""Where parsed annotations go: the receiver and the sync only talk to an :class:`AnnotationSink`.

The protocol keeps the receiver free of the database and lets it be tested against
:class:`MemorySink`, which has the same semantics as ``app.services.annotations`` (what
:class:`DatabaseSink` calls):

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
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from app.home import Home

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


class DatabaseSink:
    """The real sink: ``app.services.annotations`` in a session of its own per call (the receiver
    serves each request on its own thread). Source ``"labelstudio"``, external id = annotation id."""

    def __init__(self, home: Home, sessions: sessionmaker[Session]) -> None:
        self.home = home
        self._sessions = sessions

    @classmethod
    def for_home(cls, home: Home) -> DatabaseSink:
        """A sink on the home's database (which must already be at the newest schema)."""
        from db.engine import cached_engine, session_factory

        return cls(home, session_factory(cached_engine(home.db_url())))

    def record(self, *, image_id: int, kind: str, mask: np.ndarray | None, external_id: str,
               updated_at: datetime) -> str:
        from app.services.annotations import record_annotation

        if self.image_size(image_id) is None:
            raise UnknownImageError(f"image {image_id} is not in the database")
        with self._sessions() as session:
            result = record_annotation(session, self.home, image=image_id, kind=kind,  # type: ignore[arg-type]
                                       mask=mask, source=SOURCE, external_id=external_id,
                                       source_updated_at=updated_at)
        return result.outcome

    def delete(self, *, external_id: str) -> bool:
        from app.services.annotations import delete_annotation

        with self._sessions() as session:
            return delete_annotation(session, self.home, source=SOURCE, external_id=external_id)

    def image_size(self, image_id: int) -> tuple[int, int] | None:
        from db.models import Image

        with self._sessions() as session:
            image = session.get(Image, image_id)
            return None if image is None else (int(image.height), int(image.width))

    def known_external_ids(self) -> set[str]:
        from sqlalchemy import select

        from db.models import Annotation

        with self._sessions() as session:
            rows = session.scalars(select(Annotation.external_id).where(
                Annotation.source == SOURCE, Annotation.external_id.is_not(None), Annotation.deleted_at.is_(None)))
            return {str(r) for r in rows}

    def image_path(self, content_hash: str) -> Path | None:
        """The file of a known image by content hash, for ``GET /images/<content_hash>``."""
        from sqlalchemy import select

        from db.models import Image

        with self._sessions() as session:
            path = session.scalars(select(Image.path).where(Image.content_hash == content_hash).limit(1)).first()
        return Path(path) if path else None
