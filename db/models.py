"""Typed SQLAlchemy models: the single source of truth the hand-written migrations must match.

Enumerations are stored as short strings with a CHECK constraint (not native PostgreSQL enums) so that
the same migration works on SQLite and PostgreSQL and adding a value later is a plain constraint change.
All times are timezone-aware UTC (see `UTCDateTime`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from sqlalchemy import (
    JSON,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

ImageRole = Literal["train_normal", "pool", "evaluation"]
AnnotationKind = Literal["defect_mask", "normal", "defect_no_mask"]
VersionStatus = Literal["candidate", "active", "failed", "retired"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]

IMAGE_ROLES: tuple[str, ...] = ("train_normal", "pool", "evaluation")
ANNOTATION_KINDS: tuple[str, ...] = ("defect_mask", "normal", "defect_no_mask")
VERSION_STATUSES: tuple[str, ...] = ("candidate", "active", "failed", "retired")
JOB_STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")

# Deterministic constraint names: Alembic batch mode on SQLite and downgrades need to address them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite stores no zone, so values are converted to UTC on the way in and tagged UTC on the way out;
    naive values are taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _enum(values: tuple[str, ...], name: str) -> Enum:
    return Enum(*values, name=name, native_enum=False, create_constraint=True, validate_strings=True,
                length=max(len(v) for v in values))


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Category(Base):
    """A product class (MVTec 'bottle', 'screw', ...); one unified model serves them all."""

    __tablename__ = "categories"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    images: Mapped[list[Image]] = relationship(back_populates="category")

    def __repr__(self) -> str:
        return f"Category(id={self.id!r}, name={self.name!r})"


class Image(Base):
    """An ingested image file. `role` is its main use; ground-truth columns are kept apart from it so
    that pool images with known ground truth can also serve evaluation if the product decides so."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("category_id", "content_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id"))
    content_hash: Mapped[str] = mapped_column(String(64), index=True)  # sha256 hex of the file bytes
    path: Mapped[str] = mapped_column(String(4096), index=True)  # absolute
    role: Mapped[ImageRole] = mapped_column(_enum(IMAGE_ROLES, "image_role"), index=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    gt_label: Mapped[int | None] = mapped_column(Integer)  # 1 defective, 0 normal, None unknown
    gt_mask_path: Mapped[str | None] = mapped_column(String(4096))
    defect_type: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    category: Mapped[Category] = relationship(back_populates="images")
    annotations: Mapped[list[Annotation]] = relationship(back_populates="image")

    def __repr__(self) -> str:
        return f"Image(id={self.id!r}, role={self.role!r}, path={self.path!r})"


class Annotation(Base):
    """An inspector's verdict on one image. Rows are soft-deleted (`deleted_at`) so the training
    history of old model versions stays explainable."""

    __tablename__ = "annotations"
    __table_args__ = (
        # NULL external ids are distinct on both backends, so this only binds rows that have one.
        UniqueConstraint("source", "external_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    kind: Mapped[AnnotationKind] = mapped_column(_enum(ANNOTATION_KINDS, "annotation_kind"))
    mask_path: Mapped[str | None] = mapped_column(String(4096))
    mask_sha256: Mapped[str | None] = mapped_column(String(64))  # of shape + packed bits: cheap equality
    source: Mapped[str] = mapped_column(String(50))  # 'cli', 'labelstudio', 'ui'
    external_id: Mapped[str | None] = mapped_column(String(200))
    source_updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    image: Mapped[Image] = relationship(back_populates="annotations")

    def __repr__(self) -> str:
        return f"Annotation(id={self.id!r}, image_id={self.image_id!r}, kind={self.kind!r})"


class ModelVersion(Base):
    """A trained model: an immutable folder plus this row. Only a row makes a folder a version."""

    __tablename__ = "model_versions"
    __table_args__ = (
        # At most one active version, enforced by the database on both backends.
        Index("uq_model_versions_one_active", "status", unique=True,
              sqlite_where=text("status = 'active'"), postgresql_where=text("status = 'active'")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)  # 'v0001'
    folder: Mapped[str] = mapped_column(String(4096))  # absolute
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    status: Mapped[VersionStatus] = mapped_column(_enum(VERSION_STATUSES, "version_status"))
    # {"categories": {name: {"normal_images", "defect_masks", "confirmed_normals", "weak_defects"}},
    #  "annotation_ids": [...]}
    trained_on: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Set when a rollback moved away from this version, so a later rollback never returns to it.
    rolled_back_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    message: Mapped[str] = mapped_column(Text, default="")

    parent: Mapped[ModelVersion | None] = relationship(remote_side=[id])

    def __repr__(self) -> str:
        return f"ModelVersion(id={self.id!r}, name={self.name!r}, status={self.status!r})"


class Job(Base):
    """A row of the job queue; workers claim it under a lease that heartbeats extend."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_status_priority", "status", "priority"),
        # At most one *queued* job per coalesce key, so concurrent enqueues cannot both insert one.
        Index("uq_jobs_queued_coalesce_key", "coalesce_key", unique=True,
              sqlite_where=text("status = 'queued'"), postgresql_where=text("status = 'queued'")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(50))  # 'retrain', 'train', 'rerank', ...
    # Higher first, then oldest first: the pool's re-ranking chunks wait behind a retrain (db/queue.py).
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    status: Mapped[JobStatus] = mapped_column(_enum(JOB_STATUSES, "job_status"), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_expiries: Mapped[int] = mapped_column(Integer, default=0)  # times a worker died holding it
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1
    message: Mapped[str] = mapped_column(Text, default="")
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # what it is given (db/queue.py PAYLOADS)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # what it left, set with its success
    error: Mapped[str | None] = mapped_column(Text)
    coalesce_key: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, type={self.type!r}, status={self.status!r})"


class Metric(Base):
    """One evaluation number of one version on one category (e.g. image AUROC)."""

    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("version_id", "category_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    version: Mapped[ModelVersion] = relationship()
    category: Mapped[Category] = relationship()


class PoolScore(Base):
    """A version's anomaly score of one pool image, with its top patches and patch-grid score map."""

    __tablename__ = "pool_scores"
    __table_args__ = (
        UniqueConstraint("version_id", "image_id"),
        Index("ix_pool_scores_version_id_score", "version_id", "score"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    score: Mapped[float] = mapped_column(Float)
    # the scorer's two terms as image scores, in the class's unit: the kNN distance and the defect classifier
    # (None: no classifier for the class, the mapper scorer, or a score stored before 2026-12-07)
    knn_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    classifier_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    top_patches: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # [{"box", "score"}]
    patch_map: Mapped[bytes] = mapped_column(LargeBinary)  # float16 grid, C order
    map_shape: Mapped[list[int]] = mapped_column(JSON)  # [gh, gw]

    image: Mapped[Image] = relationship()

    def patch_map_array(self) -> np.ndarray:
        """The patch-grid score map as float16 (gh, gw)."""
        return np.frombuffer(self.patch_map, dtype=np.float16).reshape(self.map_shape)


class LabelTask(Base):
    """A pool image sent to Label Studio as a task: the Review page marks it as waiting until it has an
    annotation. One row per image and Label Studio project (sending it again changes nothing)."""

    __tablename__ = "label_tasks"
    __table_args__ = (UniqueConstraint("project_id", "image_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[int] = mapped_column(Integer)  # Label Studio's project id
    task_id: Mapped[int | None] = mapped_column(Integer)  # Label Studio's task id, when it could be read back
    model_version: Mapped[str] = mapped_column(String(50))  # the version whose score and heat map it carries
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ThresholdOverride(Base):
    """An engineer's OK/NG threshold for one class of one version, replacing the calibrated one. Rows are
    never updated: the newest row of a (version, class) is in force, the older ones are its history, and a
    row with no threshold returns the class to its calibrated threshold."""

    __tablename__ = "threshold_overrides"
    __table_args__ = (Index("ix_threshold_overrides_version_id_category_id", "version_id", "category_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id", ondelete="CASCADE"))
    threshold: Mapped[float | None] = mapped_column(Float)  # None: back to the calibrated threshold
    note: Mapped[str] = mapped_column(Text, default="")  # who and why, in the engineer's words
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
