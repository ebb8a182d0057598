"""Unlabelled folders: into the pool (`dmad ingest --pool`), and the guard before a flat folder becomes
normal training data.

A folder of line images is not a folder of normal images: defects are among them, and a normal bank
that holds them learns that those defects are normal (and a bank of thousands of images costs its
coreset gigabytes and minutes). So a flat folder given with ``--category`` is checked first (``guard``):
refused when it is much larger than the class's training set, or when many of its images score NG under
the active version (the class's OK/NG threshold in force, ``app.services.line.decisions``). The user then
sends it to the pool (``--pool``), where an inspector reviews it, or confirms it is all normal with
``--all-normal``.

``--pool`` takes the line's own way into the pool: each image is scored by the active version and stored
with its score by ``app.services.line.feed`` (what `dmad predict --ingest` and `dmad serve` do).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.home_folder import Home
from app.services.loop import versions
from db.models import Category, Image
from dmad_core.data.readers import list_images
from dmad_core.errors import Conflict, Invalid, UserError

GO_ON_FLAG = "--all-normal"


@dataclass(frozen=True)
class GuardSettings:
    """When a flat folder is too suspicious to become normal training data without a flag."""

    max_growth: float = 2.0  # refused above this many times the class's current training set ...
    min_size: int = 200  # ... once the folder holds at least this many images
    new_class_max: int = 1000  # a class with no training image yet: refused above this many
    sample: int = 64  # images scored by the active version (spread over the folder by name)
    max_ng_share: float = 0.1  # refused when more than this share of the sample scores NG


@dataclass(frozen=True)
class GuardVerdict:
    images: int
    training_images: int  # the class's normal training images today
    scored: int  # images of the sample the active version scored (0: no version knows the class)
    ng: int
    reasons: tuple[str, ...]  # empty: the folder may become normal training data

    @property
    def refused(self) -> bool:
        return bool(self.reasons)

    def message(self, folder: str | Path, category: str) -> str:
        return (f"{folder} was not added to {category}'s normal training data: " + "; ".join(self.reasons)
                + f". Unlabelled line images belong in the pool, where Review offers them to an inspector: "
                  f"`dmad ingest --pool --category {category} {folder}`. If every image really is normal, "
                  f"add {GO_ON_FLAG}.")


def _training_images(session: Session, category: str) -> int:
    return int(session.scalar(select(func.count(Image.id)).join(Category, Category.id == Image.category_id)
                              .where(Category.name == category, Image.role == "train_normal")) or 0)


def _sample(files: Sequence[Path], n: int) -> list[Path]:
    """``n`` files spread evenly over the sorted folder (deterministic)."""
    files = sorted(files)
    if len(files) <= n:
        return files
    step = len(files) / n
    return [files[int(i * step)] for i in range(n)]


def guard(home: Home, sessions: sessionmaker[Session], folder: str | Path, category: str,
          settings: GuardSettings = GuardSettings()) -> GuardVerdict:
    """Check a flat folder before its images become normal training data of ``category``.

    Args:
        home: the home (its active version scores a sample of the folder).
        sessions: the home's database.
        folder: a flat folder of images.
        category: the class they would become normal images of.
        settings: the limits.

    Returns:
        The verdict; ``refused`` with its reasons when the folder should go to the pool instead.
    """
    files = list_images(Path(folder).expanduser())
    with sessions() as session:
        training = _training_images(session, category)
        active = versions.active_version(session)
    reasons: list[str] = []
    if training == 0 and len(files) > settings.new_class_max:
        reasons.append(f"it holds {len(files):,} images for a class with no training image yet "
                       f"(more than {settings.new_class_max:,})")
    elif training and len(files) >= settings.min_size and len(files) > settings.max_growth * training:
        reasons.append(f"it holds {len(files):,} images, {len(files) / training:.1f}x the "
                       f"{training:,} normal training images {category} has today")
    scored = ng = 0
    if active is not None and files:
        from app.services.line.prediction import LineImage, LineModel

        line = LineModel.load(home, sessions, active.id)
        if category in line.thresholds:
            images = []
            for path in _sample(files, settings.sample):
                try:
                    images.append(LineImage.from_file(path, category))
                except UserError:
                    continue  # unreadable files are ingest's to report
            results = line.score(images) if images else []
            scored, ng = len(results), sum(r.decision == "NG" for r in results)
            if scored and ng > settings.max_ng_share * scored:
                reasons.append(f"{ng} of {scored} of its images scored NG under {line.version} "
                               f"(threshold of {category}: {line.thresholds[category].threshold:.3f})")
    return GuardVerdict(len(files), training, scored, ng, tuple(reasons))


@dataclass(frozen=True)
class PoolIngest:
    category: str
    version: str  # the version that scored them
    scored: int
    added: int  # new in the pool
    known: int  # already in the pool
    ng: int  # scored NG under the version's threshold
    skipped: tuple[tuple[str, str], ...]  # (path, reason)


def ingest_to_pool(home: Home, sessions: sessionmaker[Session], folder: str | Path, category: str,
                   batch_size: int = 16) -> PoolIngest:
    """Score every image of a flat folder with the active version and add it to the pool (the feed's path).

    Args:
        home: the home.
        sessions: its database.
        folder: a flat folder of images (subfolders are refused, as for a normal ingest).
        category: a class the active version knows.
        batch_size: images scored per backbone call.

    Returns:
        What was added. Conflict when no version is active (the pool is ranked by the active version),
        NotFound when it does not know ``category``, Invalid when the folder holds no readable image.
    """
    from app.services.line.feed import feed
    from app.services.line.prediction import LineImage, LineModel

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise Invalid(f"{root} is not a folder")
    nested = [p for p in list_images(root, recursive=True) if p.parent != root]
    if nested:
        raise Invalid(f"--pool takes a flat folder of images; {root} has images in subfolders "
                      f"(e.g. {nested[0].relative_to(root)})")
    with sessions() as session:
        if versions.active_version(session) is None:
            raise Conflict("the pool is ranked by the active version and there is none yet: train one with "
                           "`dmad train` first")
    line = LineModel.load(home, sessions)
    line.check_category(category)
    files = list_images(root)
    skipped: list[tuple[str, str]] = []
    scored = added = known = ng = 0
    for start in range(0, len(files), batch_size):
        images = []
        for path in files[start:start + batch_size]:
            try:
                images.append(LineImage.from_file(path, category, keep_bytes=True))
            except UserError as exc:
                skipped.append((str(path), str(exc)))
        if not images:
            continue
        results = line.score(images, cache_features=True)
        with sessions() as session:
            report = feed(session, home, line.version_id, images, results)
        scored, added, known = scored + len(results), added + report.added, known + report.known
        ng += sum(r.decision == "NG" for r in results)
    if not scored:
        raise Invalid(f"no readable image in {root}" + (f" ({len(skipped)} unreadable)" if skipped else ""))
    return PoolIngest(category, line.version, scored, added, known, ng, tuple(skipped))
