"""`dmad ingest`: category folders in the layouts the engine reads become database rows.

`train/good` images become normal training data; test images become the pool an inspector reviews,
with their ground truth (label, mask, defect type) kept on the row for evaluation only: nothing that
trains a model reads it. Unreadable files are reported and skipped, never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.engine import write_transaction
from db.models import Category, Image
from db.repositories import add_image
from dmad_core.data.readers import read_category
from dmad_core.errors import Invalid, UserError


@dataclass
class CategoryIngest:
    name: str
    layout: str
    train_normal: int = 0  # rows added by this call
    pool: int = 0
    with_masks: int = 0
    already_known: int = 0  # files whose content was already ingested in this category


@dataclass
class IngestReport:
    categories: list[CategoryIngest] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _known_ids(session: Session, name: str) -> set[int]:
    return set(session.scalars(
        select(Image.id).join(Category, Category.id == Image.category_id).where(Category.name == name)))


def ingest_folders(session: Session, folders: list[str | Path]) -> IngestReport:
    """Ingest each category folder (its name is the category) in one transaction; idempotent."""
    report = IngestReport()
    datasets = []
    for folder in folders:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise Invalid(f"{root} is not a folder; pass one folder per product class (e.g. DATA/bottle)")
        try:
            datasets.append(read_category(root))
        except (ValueError, OSError) as exc:
            raise Invalid(f"cannot read {root}: {exc}") from exc
    with write_transaction(session):
        for ds in datasets:
            if not ds.train and not ds.test:
                raise Invalid(f"{ds.root} holds no readable images in a known layout "
                                "(MVTec AD, MVTec 3D-AD RGB, or a plain folder of images)")
            known = _known_ids(session, ds.name)
            entry = CategoryIngest(ds.name, str(ds.layout))
            report.skipped += [(str(p), reason) for p, reason in ds.skipped]
            for record in ds.train:
                if record.label == 0:
                    _tally(entry, known, _add(session, report, ds.name, record.path, "train_normal"))
            for record in ds.test:
                image = _add(session, report, ds.name, record.path, "pool", gt_label=record.label,
                             gt_mask_path=record.mask_path, defect_type=record.defect_type)
                _tally(entry, known, image)
            report.categories.append(entry)
    return report


def _tally(entry: CategoryIngest, known: set[int], image: Image | None) -> None:
    if image is None:
        return
    if image.id in known:
        entry.already_known += 1
    elif image.role == "train_normal":
        entry.train_normal += 1
    else:
        entry.pool += 1
        entry.with_masks += image.gt_mask_path is not None
    known.add(image.id)


def _add(session: Session, report: IngestReport, category: str, path: Path, role: str, **gt) -> Image | None:
    try:
        with session.begin_nested():
            return add_image(session, category, path, role, **gt)  # type: ignore[arg-type]
    except UserError as exc:
        report.skipped.append((str(path), str(exc)))
        return None
