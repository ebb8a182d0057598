"""The one path through which every annotation enters: the CLI (`dmad annotate`), the Label Studio
webhook and sync, and the UI all call `record_annotation` / `delete_annotation`.

Guarantees:
- validation before anything is stored (mask exactly the image's size, image file decodes, ...);
- one transaction: the row, the mask file (`<home>/masks/<annotation id>.png`, 0/255 PNG) and the
  coalesced retrain job are stored together or not at all;
- idempotent: a redelivered or reordered annotation changes nothing and queues no retrain.

These functions commit (or roll back) themselves: pass a plain session, not one inside
`with session.begin():`.

Identity of an annotation: (source, external_id) when the source has ids (Label Studio); otherwise a
source keeps one annotation per image, and a new verdict on that image replaces the previous one.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import PIL.Image
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from app.home_folder import Home
from db.engine import write_transaction
from db.models import ANNOTATION_KINDS, Annotation, AnnotationKind, Category, Image, utcnow
from db.queue import JobType, Trigger, enqueue
from dmad_core.data.readers import load_mask as read_mask
from dmad_core.errors import Invalid, NotFound, UserError

RETRAIN_KEY = "retrain"
_HEX = re.compile(r"^[0-9a-fA-F]{8,64}$")


class AnnotationError(UserError):
    """An annotation that cannot be stored; the message says what is wrong and what to do."""


class UnknownAnnotationTarget(AnnotationError, NotFound):
    """The image (or mask file) the annotation names does not exist."""


class InvalidAnnotation(AnnotationError, Invalid):
    """The annotation itself, or the image file it is on, cannot be stored as it is."""


@dataclass(frozen=True)
class RecordResult:
    annotation_id: int
    outcome: Literal["created", "updated", "unchanged"]
    job_id: int | None  # the (coalesced) retrain job, None when nothing changed


def find_image(session: Session, ref: Image | str | int) -> Image:
    """An ingested image by id, by file path (absolute or relative to the working directory), or by
    a prefix of its content hash (at least 8 hex characters)."""
    if isinstance(ref, Image):
        found = session.get(Image, ref.id)
        if found is None:
            raise UnknownAnnotationTarget(f"image {ref.id} is not in the database; ingest it first with `dmad ingest`")
        return found
    if isinstance(ref, int) and not isinstance(ref, bool):
        found = session.get(Image, ref)
        if found is None:
            raise UnknownAnnotationTarget(f"image {ref} is not in the database; ingest it first with `dmad ingest`")
        return found
    text = str(ref).strip()
    if text:
        expanded = os.path.expanduser(text)
        paths = {str(Path(expanded).resolve()), os.path.abspath(expanded)}
        by_path = list(session.scalars(select(Image).where(Image.path.in_(paths)).limit(2)))
        if len(by_path) == 1:
            return by_path[0]
        if len(by_path) > 1:
            raise InvalidAnnotation(f"image file {text} was ingested in several categories; refer to it by id")
        if text.isdigit() and (found := session.get(Image, int(text))) is not None:
            return found
        if _HEX.match(text):
            by_hash = list(session.scalars(
                select(Image).where(Image.content_hash.startswith(text.lower(), autoescape=True)).limit(2)))
            if len(by_hash) == 1:
                return by_hash[0]
            if len(by_hash) > 1:
                raise InvalidAnnotation(f"hash prefix {text} matches several images; give more characters or the id")
    raise UnknownAnnotationTarget(f"image {text or ref!r} is not in the database; ingest it first with `dmad ingest`")


def _as_mask(mask: np.ndarray, image: Image) -> np.ndarray:
    """A validated boolean mask of exactly the image's (height, width)."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise InvalidAnnotation(f"the mask must be a 2-D (height, width) array; got shape {arr.shape}")
    if arr.dtype == np.bool_:
        out = arr
    elif np.issubdtype(arr.dtype, np.integer):
        zero = arr == 0
        if not (zero | (arr == 1)).all() and not (zero | (arr == 255)).all():
            raise InvalidAnnotation(f"mask values must be 0/1 or 0/255; found {np.unique(arr)[:10].tolist()}")
        out = ~zero
    else:
        raise InvalidAnnotation(f"the mask must be boolean or uint8 (0/1 or 0/255), not {arr.dtype}; "
                              "threshold it first, e.g. mask > 0.5")
    if arr.shape != (image.height, image.width):
        raise InvalidAnnotation(
            f"the mask is {arr.shape[1]}x{arr.shape[0]} (width x height) but image {image.id} ({image.path}) "
            f"is {image.width}x{image.height}; masks must match the image exactly")
    return out


def _mask_sha256(mask: np.ndarray) -> str:
    h, w = mask.shape
    return hashlib.sha256(f"{h}x{w}:".encode() + np.packbits(mask).tobytes()).hexdigest()


def _check_image_file(image: Image) -> None:
    try:
        with PIL.Image.open(image.path) as im:
            im.load()
            size = im.size
    except FileNotFoundError as exc:
        raise InvalidAnnotation(f"image file {image.path} (image {image.id}) no longer exists; "
                              "restore it or re-ingest with `dmad ingest`") from exc
    except Exception as exc:
        raise InvalidAnnotation(f"corrupt or unreadable image file {image.path} (image {image.id}): {exc}; "
                              "replace the file and re-ingest it with `dmad ingest`") from exc
    if size != (image.width, image.height):
        raise InvalidAnnotation(f"image file {image.path} is now {size[0]}x{size[1]} but was ingested as "
                              f"{image.width}x{image.height}; re-ingest it with `dmad ingest`")


def _utc(value: datetime | None) -> datetime | None:
    """Timezone-aware UTC; a naive time is taken to be UTC already."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass
class _MaskFiles:
    """Mask file changes that follow the database transaction: applied before the commit (each file
    swapped in atomically, the old one kept as a hard-link backup) and undone if the commit fails."""

    undo: list[tuple[Path, Path | None]] = field(default_factory=list)  # (final, backup or None)

    def put(self, final: Path, mask: np.ndarray) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex
        tmp = final.with_name(f".{final.name}.{tag}.tmp")
        try:
            with open(tmp, "wb") as f:
                PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(f, format="PNG")
                f.flush()
                os.fsync(f.fileno())
            backup = None
            if final.exists():
                backup = final.with_name(f".{final.name}.{tag}.bak")
                os.link(final, backup)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        self.undo.append((final, backup))

    def remove(self, final: Path) -> None:
        if final.exists():
            backup = final.with_name(f".{final.name}.{uuid.uuid4().hex}.bak")
            os.replace(final, backup)
            self.undo.append((final, backup))

    def commit(self) -> None:
        for _final, backup in self.undo:
            if backup is not None:
                backup.unlink(missing_ok=True)
        self.undo.clear()

    def rollback(self) -> None:
        for final, backup in reversed(self.undo):
            if backup is not None:
                os.replace(backup, final)
            else:
                final.unlink(missing_ok=True)
        self.undo.clear()


def mask_file(home: Home, annotation_id: int) -> Path:
    return home.masks_dir / f"{annotation_id}.png"


def record_annotation(session: Session, home: Home, *, image: Image | str | int, kind: AnnotationKind,
                      mask: np.ndarray | None = None, source: str = "cli", external_id: str | None = None,
                      source_updated_at: datetime | None = None, enqueue_retrain: bool = True,
                      category: str | None = None) -> RecordResult:
    """Validate and store one annotation, with its mask file and a coalesced retrain job, atomically.

    Outcomes: 'created'; 'updated' (a newer `source_updated_at`, or different content when the source
    gives no times; a soft-deleted annotation comes back this way); 'unchanged' (a redelivery, or an
    older `source_updated_at` than stored: reordered deliveries never overwrite newer data).
    The session's open transaction, if any, is committed first; on error everything is rolled back.
    """
    if kind not in ANNOTATION_KINDS:
        raise InvalidAnnotation(f"annotation kind must be one of {', '.join(ANNOTATION_KINDS)}, not {kind!r}")
    if kind == "defect_mask" and mask is None:
        raise InvalidAnnotation("a 'defect_mask' annotation needs a mask; without one use kind 'defect_no_mask'")
    if kind != "defect_mask" and mask is not None:
        raise InvalidAnnotation(f"a {kind!r} annotation takes no mask; for a defect with a mask use 'defect_mask'")
    if not source:
        raise InvalidAnnotation("an annotation needs a source ('cli', 'labelstudio', 'ui')")
    if category is not None:
        _check_category(session, image, category)
    external_id = None if external_id is None else str(external_id)
    ts = _utc(source_updated_at)
    for attempt in range(2):
        try:
            return _record(session, home, image, kind, mask, source, external_id, ts, enqueue_retrain)
        except IntegrityError:
            if attempt:  # a concurrent delivery inserted the same annotation: the retry finds it
                raise
    raise AssertionError("unreachable")


def _check_category(session: Session, image: Image | str | int, category: str) -> None:
    """The caller says which category the image is in (`dmad annotate --category`): a typo in the image
    reference must not annotate an image of another product class."""
    if session.scalars(select(Category).where(Category.name == category)).first() is None:
        raise UnknownAnnotationTarget(f"unknown category {category!r}; ingest it first with `dmad ingest`")
    found = find_image(session, image)
    if found.category.name != category:
        raise InvalidAnnotation(f"{image} is in category {found.category.name!r}, not {category!r}")


def _record(session: Session, home: Home, image_ref: Image | str | int, kind: AnnotationKind,
            mask: np.ndarray | None, source: str, external_id: str | None, ts: datetime | None,
            enqueue_retrain: bool) -> RecordResult:
    image_id = image_ref.id if isinstance(image_ref, Image) else None
    files = _MaskFiles()
    try:
        with write_transaction(session):
            image = find_image(session, image_id if image_id is not None else image_ref)
            bool_mask = _as_mask(mask, image) if mask is not None else None
            if bool_mask is not None and not bool_mask.any():
                raise InvalidAnnotation("the mask is empty; mark the image 'normal' or draw the defect")
            mask_hash = _mask_sha256(bool_mask) if bool_mask is not None else None

            existing = _existing(session, image, source, external_id)
            outcome = _outcome(existing, image, kind, mask_hash, ts)
            if outcome == "unchanged":
                assert existing is not None
                return RecordResult(existing.id, "unchanged", None)  # nothing was written

            _check_image_file(image)
            now = utcnow()
            if existing is None:
                annotation = Annotation(image_id=image.id, kind=kind, source=source, external_id=external_id,
                                        source_updated_at=ts, created_at=now, updated_at=now)
                session.add(annotation)
                session.flush()
            else:
                annotation = existing
                annotation.image_id = image.id
                annotation.kind = kind
                annotation.source_updated_at = ts if ts is not None else annotation.source_updated_at
                annotation.updated_at = now
                annotation.deleted_at = None
            path = mask_file(home, annotation.id)
            if bool_mask is not None:
                files.put(path, bool_mask)
                annotation.mask_path = str(path)
            else:
                files.remove(path)
                annotation.mask_path = None
            annotation.mask_sha256 = mask_hash
            job_id = None
            if enqueue_retrain:
                job_id = enqueue(session, JobType.RETRAIN, Trigger(trigger="annotations"), coalesce_key=RETRAIN_KEY).id
            session.flush()
            result = RecordResult(annotation.id, outcome, job_id)
    except BaseException:
        files.rollback()
        raise
    files.commit()
    return result


def _existing(session: Session, image: Image, source: str, external_id: str | None) -> Annotation | None:
    """The stored annotation this one would replace, freshly read (the session may hold a stale copy)."""
    if external_id is not None:
        query = select(Annotation).where(Annotation.source == source, Annotation.external_id == external_id)
    else:
        query = (select(Annotation)
                 .where(Annotation.image_id == image.id, Annotation.source == source,
                        Annotation.external_id.is_(None), Annotation.deleted_at.is_(None))
                 .order_by(Annotation.id.desc()).limit(1))
    return session.scalars(query.execution_options(populate_existing=True)).first()


def _outcome(existing: Annotation | None, image: Image, kind: str, mask_hash: str | None,
             ts: datetime | None) -> Literal["created", "updated", "unchanged"]:
    if existing is None:
        return "created"
    if ts is not None and existing.source_updated_at is not None:
        return "updated" if ts > existing.source_updated_at else "unchanged"
    if existing.deleted_at is not None:
        return "updated"  # no times to compare: the source says it exists again
    same = existing.kind == kind and existing.mask_sha256 == mask_hash and existing.image_id == image.id
    return "unchanged" if same else "updated"


def delete_annotation(session: Session, home: Home, *, source: str | None = None, external_id: str | None = None,
                      annotation_id: int | None = None, enqueue_retrain: bool = True) -> bool:
    """Soft-delete an annotation by (source, external_id) or by id; the row and its mask file stay
    for history. Idempotent: False when there is nothing (left) to delete."""
    if annotation_id is None and (source is None or external_id is None):
        raise InvalidAnnotation("say which annotation to delete: a source and external id, or an annotation id")
    with write_transaction(session):
        if annotation_id is not None:
            annotation = session.get(Annotation, annotation_id, populate_existing=True)
        else:
            annotation = session.scalars(
                select(Annotation).where(Annotation.source == source, Annotation.external_id == str(external_id))
                .execution_options(populate_existing=True)
            ).first()
        if annotation is None or annotation.deleted_at is not None:
            return False
        now = utcnow()
        annotation.deleted_at = now
        annotation.updated_at = now
        if enqueue_retrain:
            enqueue(session, JobType.RETRAIN, Trigger(trigger="annotations"), coalesce_key=RETRAIN_KEY)
    return True


def active_annotations(session: Session) -> list[Annotation]:
    """Annotations not deleted, oldest first, each with its image loaded: what a retrain uses."""
    return list(session.scalars(
        select(Annotation).where(Annotation.deleted_at.is_(None))
        .options(selectinload(Annotation.image)).order_by(Annotation.id)
    ))


def load_mask(annotation: Annotation, home: Home) -> np.ndarray:
    """The annotation's defect mask as a boolean (height, width) array, read by the engine's one
    `load_mask` (any nonzero pixel is defect; the masks this module writes are 0/255)."""
    if annotation.kind != "defect_mask":
        raise InvalidAnnotation(f"annotation {annotation.id} is {annotation.kind!r} and has no mask")
    path = mask_file(home, annotation.id)
    try:
        return read_mask(path)
    except FileNotFoundError as exc:
        raise UnknownAnnotationTarget(f"mask file {path} of annotation {annotation.id} is missing") from exc
