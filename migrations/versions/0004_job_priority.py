"""Job priority: a retrain goes before the pool's re-ranking chunks, which any number of workers share.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
    op.create_index("ix_jobs_status_priority", "jobs", ["status", "priority"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_priority", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("priority")
