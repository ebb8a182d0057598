"""The model version registry: immutable folders under `home.models_dir` plus database rows.

A version is written into `models/.tmp-<name>-<uuid>/`, fsynced, renamed to `models/<name>/` in one
atomic rename, and only then given a row. The row is what makes a folder a version: a `.tmp-*` folder
or a folder without a row is never listed, never active, and `cleanup_orphans` reports or removes it.
The active version is the one row with status 'active' (a partial unique index allows no second one).
Files of a published version are made read-only: workers on other machines read the folder over a shared
file system, and nothing may change a version once a row names it.
`commit_version`, `promote` and `rollback` commit themselves: pass a plain session.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.home_folder import Home, HomeSettings
from app.services.loop.reranking import plan_rerank
from db.engine import write_transaction
from db.models import ModelVersion, VersionStatus, utcnow
from dmad_core.errors import Conflict, NotFound, UserError

_NAME = re.compile(r"^v(\d{4,})$")
_TMP = re.compile(r"^\.tmp-(v\d{4,})-[0-9a-f]+$")
TMP_MAX_AGE_SECONDS = 3600.0


class VersionError(UserError):
    """A version operation that cannot be done (message says why and what to do)."""


class VersionNotFound(VersionError, NotFound):
    """No such version (or no such temporary folder to publish)."""


class VersionConflict(VersionError, Conflict):
    """The registry's current state does not allow the operation."""


def _number(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def new_version_dir(home: Home, session: Session | None = None) -> tuple[str, Path]:
    """Allocate the next name (v0001, v0002, ...) and create an empty temporary folder to write into.

    The name is one past every name in use: final folders, temporary folders and, when a session is
    given, database rows (a deleted folder must not hand its name out again).
    """
    home.models_dir.mkdir(parents=True, exist_ok=True)
    used = [0]
    for entry in home.models_dir.iterdir():
        tmp = _TMP.match(entry.name)
        n = _number(tmp.group(1) if tmp else entry.name)
        if n is not None:
            used.append(n)
    if session is not None:
        used.extend(n for n in map(_number, session.scalars(select(ModelVersion.name))) if n is not None)
    name = f"v{max(used) + 1:04d}"
    tmp_path = home.models_dir / f".tmp-{name}-{uuid.uuid4().hex}"
    tmp_path.mkdir()
    return name, tmp_path


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk, so the rename publishes complete data, and make
    every file read-only (folders stay writable, so a failed version's folder can still be removed)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            os.chmod(os.path.join(dirpath, filename), 0o444)
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_version(session: Session, home: Home, name: str, tmp_path: Path, config: dict[str, Any],
                   parent_id: int | None, trained_on: dict[str, Any],
                   status: VersionStatus = "candidate", message: str = "") -> ModelVersion:
    """Publish a finished temporary folder as version `name` and record its row (committed).

    With status 'active' the previous active version is retired in the same transaction. If the row
    cannot be written, the folder is renamed back to its temporary name so it never looks published.
    """
    if _number(name) is None:
        raise ValueError(f"bad version name {name!r}; use new_version_dir() to allocate one")
    tmp_path = Path(tmp_path)
    if not tmp_path.is_dir():
        raise VersionNotFound(f"temporary version folder {tmp_path} does not exist")
    final = home.models_dir / name
    if final.exists():
        raise VersionConflict(f"version folder {final} already exists; allocate a new name with new_version_dir()")
    _fsync_tree(tmp_path)
    os.rename(tmp_path, final)  # atomic on one file system; fails if `final` appeared meanwhile
    _fsync_dir(home.models_dir)
    try:
        with write_transaction(session):
            version = ModelVersion(name=name, folder=str(final.resolve()), config=dict(config),
                                   parent_id=parent_id, status="candidate", trained_on=dict(trained_on),
                                   message=message)
            session.add(version)
            session.flush()
            if status == "active":
                _activate(session, version, HomeSettings.rerank_chunk_images)
            else:
                version.status = status
    except BaseException:
        os.rename(final, tmp_path)
        raise
    return version


def active_version(session: Session) -> ModelVersion | None:
    return session.scalars(select(ModelVersion).where(ModelVersion.status == "active")).first()


def version_or_active(session: Session, ref: int | str | None = None) -> ModelVersion:
    """The version ``ref`` names (``get_version``), or the active one; Conflict when there is none."""
    if ref is not None:
        return get_version(session, ref)
    version = active_version(session)
    if version is None:
        raise VersionConflict("no active model version; train one first (`dmad train`)")
    return version


def list_versions(session: Session) -> list[ModelVersion]:
    """All versions, oldest first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.id)))


def get_version(session: Session, ref: int | str) -> ModelVersion:
    """By id or name ('v0003'); VersionError when there is no such version."""
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        version = session.get(ModelVersion, int(ref))
    else:
        version = session.scalars(select(ModelVersion).where(ModelVersion.name == ref)).first()
    if version is None:
        raise VersionNotFound(f"model version {ref} does not exist; list them with `dmad versions`")
    return version


def _activate(session: Session, version: ModelVersion, chunk_images: int) -> None:
    """Retire the current active version, then activate `version` (two flushes: the partial unique
    index is checked per statement, and the unit of work would otherwise order updates by id), and queue
    the re-ranking of the pool under it in the same transaction."""
    now = utcnow()
    current = session.scalars(
        select(ModelVersion).where(ModelVersion.status == "active").with_for_update()
        .execution_options(populate_existing=True)
    ).first()
    if current is not None and current.id != version.id:
        current.status = "retired"
        session.flush()
    version.status = "active"
    version.activated_at = now
    version.rolled_back_at = None
    session.flush()
    plan_rerank(session, version, None if current is None else current.id, chunk_images)


def promote(session: Session, version_id: int, chunk_images: int = HomeSettings.rerank_chunk_images) -> ModelVersion:
    """Make a version the active one, retiring the current one, in one transaction that also queues the
    pool's re-ranking under it in chunks of `chunk_images` (app/services/loop/reranking.py)."""
    with write_transaction(session):
        version = session.get(ModelVersion, version_id, populate_existing=True)
        if version is None:
            raise VersionNotFound(f"model version {version_id} does not exist; list them with `dmad versions`")
        if version.status == "failed":
            raise VersionConflict(f"model version {version.name} failed to train and cannot be promoted")
        if version.status != "active":
            _activate(session, version, chunk_images)
        else:  # promoting the active version again queues what its re-ranking is missing (failed chunks)
            plan_rerank(session, version, version.parent_id, chunk_images)
    return version


def rollback(session: Session, chunk_images: int = HomeSettings.rerank_chunk_images) -> ModelVersion:
    """Go back to the version that was active before the current one, in one transaction.

    The current version becomes 'retired' and is marked rolled back, so that a second rollback goes
    one further back instead of returning to it. Returns the version now active.
    """
    with write_transaction(session):
        current = session.scalars(
            select(ModelVersion).where(ModelVersion.status == "active").with_for_update()
            .execution_options(populate_existing=True)
        ).first()
        if current is None or current.activated_at is None:
            raise VersionConflict("there is no active model version to roll back from")
        previous = session.scalars(
            select(ModelVersion)
            .where(ModelVersion.status == "retired", ModelVersion.activated_at.is_not(None),
                   ModelVersion.activated_at < current.activated_at, ModelVersion.rolled_back_at.is_(None))
            .order_by(ModelVersion.activated_at.desc(), ModelVersion.id.desc())
            .limit(1).execution_options(populate_existing=True)
        ).first()
        if previous is None:
            raise VersionConflict(
                f"{current.name} is the first version ever activated; there is nothing to roll back to")
        now = utcnow()
        current.status = "retired"
        current.rolled_back_at = now
        session.flush()
        previous.status = "active"
        previous.activated_at = now
        session.flush()
        plan_rerank(session, previous, current.id, chunk_images)
    return previous


@dataclass
class OrphanReport:
    removed_tmp: list[Path] = field(default_factory=list)  # stale temporary folders deleted
    kept_tmp: list[Path] = field(default_factory=list)  # temporary folders young enough to be in use
    folders_without_rows: list[Path] = field(default_factory=list)  # reported, never deleted
    rows_without_folders: list[str] = field(default_factory=list)  # version names


def cleanup_orphans(session: Session, home: Home, max_age_seconds: float = TMP_MAX_AGE_SECONDS) -> OrphanReport:
    """Remove temporary folders older than `max_age_seconds` (a training that died) and report
    folders without rows and rows without folders. Folders without rows are left for a human."""
    report = OrphanReport()
    if not home.models_dir.exists():
        return report
    folders = {v.name: v.folder for v in session.scalars(select(ModelVersion))}
    now = time.time()
    for entry in sorted(home.models_dir.iterdir()):
        if not entry.is_dir():
            continue
        if entry.name.startswith(".tmp-"):
            if now - entry.stat().st_mtime > max_age_seconds:
                shutil.rmtree(entry)
                report.removed_tmp.append(entry)
            else:
                report.kept_tmp.append(entry)
        elif entry.name not in folders:
            report.folders_without_rows.append(entry)
    report.rows_without_folders = sorted(n for n, f in folders.items() if not Path(f).is_dir())
    return report
