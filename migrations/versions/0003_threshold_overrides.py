"""Threshold overrides: an engineer's per-class OK/NG threshold of a version, kept as a history.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "threshold_overrides",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("category_id", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_threshold_overrides"),
        sa.ForeignKeyConstraint(["version_id"], ["model_versions.id"], ondelete="CASCADE",
                                name="fk_threshold_overrides_version_id_model_versions"),
        sa.ForeignKeyConstraint(["category_id"], ["categories.id"], ondelete="CASCADE",
                                name="fk_threshold_overrides_category_id_categories"),
    )
    op.create_index("ix_threshold_overrides_version_id_category_id", "threshold_overrides",
                    ["version_id", "category_id"])


def downgrade() -> None:
    op.drop_table("threshold_overrides")
