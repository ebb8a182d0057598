"""The feed: every image the line scores (`dmad serve`, `dmad predict --ingest`) joins the pool with its
score, so Review shows the most anomalous images of today's production.

Each image's bytes are stored once in the home's image store, ``<home>/images/<aa>/<sha256><ext>``,
written to a temporary name and renamed (a crash leaves no half-written image under its final name);
its row is the usual pool image (``db.repositories.add_image``, idempotent on class and content) and its
score the version's pool score. Retention keeps the line's share of the pool bounded
(``HomeSettings.line_pool_max_images``): past it the oldest line images go, rows and files, except those
an inspector annotated or sent to Label Studio.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
from sqlalchemy import delete, exists, func, select
from sqlalchemy.orm import Session

from app.home_folder import Home
from app.services.line.prediction import LineImage, LineResult
from db.engine import write_transaction
from db.models import Annotation, Category, Image, LabelTask
from db.repositories import PoolScoreRow, add_image, store_pool_scores


@dataclass(frozen=True)
class FeedReport:
    added: int  # new pool images
    known: int  # images the pool already held (scored again)
    removed: int  # old line images removed by retention


def stored_path(home: Home, image: LineImage) -> Path:
    """Where the image store keeps these bytes (the extension from the bytes' own format)."""
    assert image.data is not None, "keep_bytes=True when an image is to join the pool"
    with PIL.Image.open(io.BytesIO(image.data)) as im:
        ext = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}.get(im.format or "", ".img")
    return home.images_dir / image.content_hash[:2] / f"{image.content_hash}{ext}"


def _store(home: Home, image: LineImage) -> Path:
    path = stored_path(home, image)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(image.data or b"")
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        except BaseException:  # a full disk: no half-written image left, under any name
            tmp.unlink(missing_ok=True)
            raise
    return path


def feed(session: Session, home: Home, version_id: int, images: Sequence[LineImage],
         results: Sequence[LineResult]) -> FeedReport:
    """Store scored images in the pool with their scores under ``version_id`` (one transaction), then
    apply retention."""
    paths = [_store(home, img) for img in images]
    rows: dict[int, PoolScoreRow] = {}  # by image: the same bytes twice in one batch are one row, one score
    added, known = 0, 0
    with write_transaction(session):
        held = set(session.execute(
            select(Category.name, Image.content_hash).join(Category, Category.id == Image.category_id)
            .where(Image.content_hash.in_([img.content_hash for img in images]))).all())
        for img, result, path in zip(images, results, paths, strict=True):
            is_known = (img.category, img.content_hash) in held
            added, known = added + (not is_known), known + is_known
            held.add((img.category, img.content_hash))
            row = add_image(session, img.category, path, "pool")
            if row.role != "pool":
                continue  # the same bytes are a training image of the class: not the pool's
            rows[row.id] = PoolScoreRow(row.id, result.score, result.patch_map, result.top_patches)
        store_pool_scores(session, version_id, list(rows.values()))
    return FeedReport(added, known, apply_retention(session, home))


def apply_retention(session: Session, home: Home) -> int:
    """Remove the oldest line images past the home's limit (never an annotated or sent one); returns how many."""
    limit = home.load_settings().line_pool_max_images
    if limit is None:
        return 0
    prefix = f"{home.images_dir}{os.sep}"
    line = Image.path.startswith(prefix, autoescape=True)
    count = int(session.scalar(select(func.count(Image.id)).where(line)) or 0)
    if count <= limit:
        return 0
    removable = (select(Image.id, Image.path).where(line)
                 .where(~exists().where(Annotation.image_id == Image.id))
                 .where(~exists().where(LabelTask.image_id == Image.id))
                 .order_by(Image.created_at, Image.id).limit(count - limit))
    with write_transaction(session):
        doomed = session.execute(removable).all()
        ids = [image_id for image_id, _ in doomed]
        for start in range(0, len(ids), 500):
            session.execute(delete(Image).where(Image.id.in_(ids[start:start + 500])))
    for _, path in doomed:
        Path(path).unlink(missing_ok=True)
    return len(doomed)
