"""The webhook's and the sync's database adapter: an :class:`annotation.sink.AnnotationSink` over
``app.services.annotations``, so Label Studio's annotations enter through the same one path as every
other (validation, mask file, retrain job, all in one transaction)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from annotation.sink import SOURCE, UnknownImageError
from app.home_folder import Home
from app.services.annotations import delete_annotation, record_annotation
from db.models import Annotation, Image


class DatabaseSink:
    """The real sink: ``app.services.annotations`` in a session of its own per call (the receiver
    serves each request on its own thread). Source ``"labelstudio"``, external id = annotation id."""

    def __init__(self, home: Home, sessions: sessionmaker[Session]) -> None:
        self.home = home
        self._sessions = sessions

    def record(self, *, image_id: int, kind: str, mask: np.ndarray | None, external_id: str,
               updated_at: datetime) -> str:
        if self.image_size(image_id) is None:
            raise UnknownImageError(f"image {image_id} is not in the database")
        with self._sessions() as session:
            result = record_annotation(session, self.home, image=image_id, kind=kind,  # type: ignore[arg-type]
                                       mask=mask, source=SOURCE, external_id=external_id,
                                       source_updated_at=updated_at)
        return result.outcome

    def delete(self, *, external_id: str) -> bool:
        with self._sessions() as session:
            return delete_annotation(session, self.home, source=SOURCE, external_id=external_id)

    def image_size(self, image_id: int) -> tuple[int, int] | None:
        with self._sessions() as session:
            image = session.get(Image, image_id)
            return None if image is None else (int(image.height), int(image.width))

    def known_external_ids(self) -> set[str]:
        with self._sessions() as session:
            rows = session.scalars(select(Annotation.external_id).where(
                Annotation.source == SOURCE, Annotation.external_id.is_not(None), Annotation.deleted_at.is_(None)))
            return {str(r) for r in rows}

    def image_path(self, content_hash: str) -> Path | None:
        """The file of a known image by content hash, for ``GET /images/<content_hash>``."""
        with self._sessions() as session:
            path = session.scalars(select(Image.path).where(Image.content_hash == content_hash).limit(1)).first()
        return Path(path) if path else None
