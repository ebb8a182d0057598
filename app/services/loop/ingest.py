"""`dmad ingest`: category folders in the layouts the engine reads become database rows.

`train/good` images become normal training data; test images become the pool an inspector reviews,
with their ground truth (label, mask, defect type) kept on the row for evaluation only: nothing that
trains a model reads it. Unreadable files are reported (once) and skipped, never a crash.

A flat folder of images is one class of normal images whose name the user gives (``category``): a
folder name is no class name, and one stray file must not create a class. A folder that is neither a
dataset layout nor a flat folder (images in subfolders, no images) is refused with the layouts accepted,
and so is an ingest that finds nothing usable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.engine import write_transaction
from db.models import Category, Image
from db.repositories import add_image
from dmad_core.data.readers import CategoryDataset, detect_layout, list_images, read_category
from dmad_core.errors import Invalid, UserError


@dataclass
class CategoryIngest:
    name: str
    layout: str
    train_normal: int = 0  # rows added by this call
    pool: int = 0
    with_masks: int = 0
    already_known: int = 0  # files whose content was already ingested in this category
    skipped: int = 0  # unreadable or refused files of this folder

    @property
    def usable(self) -> int:
        return self.train_normal + self.pool + self.already_known


@dataclass
class IngestReport:
    categories: list[CategoryIngest] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _known_ids(session: Session, name: str) -> set[int]:
    return set(session.scalars(
        select(Image.id).join(Category, Category.id == Image.category_id).where(Category.name == name)))


ACCEPTED_LAYOUTS = ("MVTec AD (<class>/train/good/*.png, <class>/test/<defect>/*.png), MVTec 3D-AD "
                    "(<class>/train/good/rgb/*.png, <class>/test/<defect>/rgb/*.png), or a flat folder of normal "
                    "images of one class with --category NAME")


def read_folder(folder: str | Path, category: str | None = None) -> CategoryDataset:
    """One folder as a class to ingest: a dataset layout (the class is named after the folder) or a flat
    folder of images (the class is ``category``, required); Invalid for anything else.

    Args:
        folder: a class folder in a dataset layout, or a folder whose images are all directly inside it.
        category: the class of a flat folder; refused for a dataset layout, which names its class itself.

    Returns:
        The folder's images, its unreadable files in ``skipped`` (not logged: the caller reports them).

    Example:
        >>> ds = read_folder("photos/2026-12-01", category="washer")  # doctest: +SKIP
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise Invalid(f"{root} is not a folder; pass one folder per product class (e.g. DATA/bottle)")
    try:
        layout = detect_layout(root)
    except ValueError as exc:
        raise Invalid(f"cannot read {root}: {exc}") from exc
    if layout == "folder":
        nested = [p for p in list_images(root, recursive=True) if p.parent != root]
        if nested:
            raise Invalid(f"{root} is neither a dataset layout nor a flat folder of images: it has images in "
                          f"subfolders (e.g. {nested[0].relative_to(root)}); accepted: {ACCEPTED_LAYOUTS}")
        if not category:
            raise Invalid(f"{root} is a flat folder of {len(list_images(root))} image(s), not a dataset layout: "
                          f"say which class they are normal images of with --category NAME")
    elif category:
        raise Invalid(f"{root} is in the {layout} layout, which names its class after its folder "
                      f"({root.name}); --category is for a flat folder of images")
    try:
        ds = read_category(root, log_skipped=False)
    except (ValueError, OSError) as exc:
        raise Invalid(f"cannot read {root}: {exc}") from exc
    return replace(ds, name=category) if layout == "folder" else ds


def ingest_folders(session: Session, folders: list[str | Path], category: str | None = None) -> IngestReport:
    """Ingest each folder (see ``read_folder``) in one transaction; idempotent. Invalid, and nothing
    stored, when a folder is in no accepted layout or when no folder holds a usable image."""
    report = IngestReport()
    datasets = [read_folder(folder, category) for folder in folders]
    with write_transaction(session):
        for ds in datasets:
            known = _known_ids(session, ds.name)
            entry = CategoryIngest(ds.name, str(ds.layout), skipped=len(ds.skipped))
            report.skipped += [(str(p), reason) for p, reason in ds.skipped]
            for record in ds.train:
                if record.label == 0:
                    _tally(entry, known, _add(session, report, ds.name, record.path, "train_normal"))
            for record in ds.test:
                image = _add(session, report, ds.name, record.path, "pool", gt_label=record.label,
                             gt_mask_path=record.mask_path, defect_type=record.defect_type)
                _tally(entry, known, image)
            report.categories.append(entry)
        if not any(entry.usable for entry in report.categories):  # raised inside: nothing is stored
            problems = "; ".join(f"{path}: {reason}" for path, reason in report.skipped[:3])
            raise Invalid(f"no usable image in {', '.join(map(str, folders))}"
                          + (f" ({len(report.skipped)} unreadable, e.g. {problems})" if problems else "")
                          + f"; accepted: {ACCEPTED_LAYOUTS}")
    return report


def _tally(entry: CategoryIngest, known: set[int], image: Image | None) -> None:
    if image is None:
        entry.skipped += 1
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
