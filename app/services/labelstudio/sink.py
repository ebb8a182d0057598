"""The webhook's and the sync's database adapter: an :class:`annotation.sink.AnnotationSink` over
``app.services.loop.annotations``, so Label Studio's annotations enter through the same one path as every
other (validation, mask file, retrain job, all in one transaction)."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from annotation.sink import SOURCE, UnknownImageError
from app.home_folder import Home
from app.services.loop.annotations import delete_annotation, record_annotation
from db.engine import DATABASE_AWAY
from db.models import Annotation, Image
from dmad_core.errors import Unavailable

_F = TypeVar("_F", bound=Callable[..., Any])
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _answerable(method: _F) -> _F:
    """The database away or a full disk become ``Unavailable`` (the webhook's 503 with Retry-After, so
    Label Studio's next sync brings the annotation), never a 500 and never half a record: the annotation,
    its mask and its retrain job are one transaction (app/services/loop/annotations.py)."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except DATABASE_AWAY as exc:
            raise Unavailable("the database does not answer; the annotation comes with the next sync") from exc
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise Unavailable(f"the home's disk is full ({exc.strerror}); free space, the annotation "
                                  "comes with the next sync") from exc
            raise
    return wrapper  # type: ignore[return-value]


class DatabaseSink:
    """The real sink: ``app.services.loop.annotations`` in a session of its own per call (the receiver
    serves each request on its own thread). Source ``"labelstudio"``, external id = annotation id."""

    def __init__(self, home: Home, sessions: sessionmaker[Session]) -> None:
        self.home = home
        self._sessions = sessions

    @_answerable
    def record(self, *, image_id: int, kind: str, mask: np.ndarray | None, external_id: str,
               updated_at: datetime) -> str:
        if self.image_size(image_id) is None:
            raise UnknownImageError(f"image {image_id} is not in the database")
        with self._sessions() as session:
            result = record_annotation(session, self.home, image=image_id, kind=kind,  # type: ignore[arg-type]
                                       mask=mask, source=SOURCE, external_id=external_id,
                                       source_updated_at=updated_at)
        return result.outcome

    @_answerable
    def delete(self, *, external_id: str) -> bool:
        with self._sessions() as session:
            return delete_annotation(session, self.home, source=SOURCE, external_id=external_id)

    @_answerable
    def image_size(self, image_id: int) -> tuple[int, int] | None:
        with self._sessions() as session:
            image = session.get(Image, image_id)
            return None if image is None else (int(image.height), int(image.width))

    @_answerable
    def known_external_ids(self) -> set[str]:
        with self._sessions() as session:
            rows = session.scalars(select(Annotation.external_id).where(
                Annotation.source == SOURCE, Annotation.external_id.is_not(None), Annotation.deleted_at.is_(None)))
            return {str(r) for r in rows}

    @_answerable
    def image_path(self, content_hash: str) -> Path | None:
        """The file of a known image by content hash, for ``GET /images/<content_hash>``."""
        with self._sessions() as session:
            path = session.scalars(select(Image.path).where(Image.content_hash == content_hash).limit(1)).first()
        return Path(path) if path else None
