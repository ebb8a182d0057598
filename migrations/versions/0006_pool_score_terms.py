"""Pool score terms: each pool score keeps the scorer's two terms alone (the kNN distance and the class's defect
classifier, as image scores in the class's unit), so Review can offer the images on which they disagree.

Both columns are nullable: scores stored before have none until the pool is ranked again (the next version).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pool_scores") as batch:
        batch.add_column(sa.Column("knn_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("classifier_score", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pool_scores") as batch:
        batch.drop_column("classifier_score")
        batch.drop_column("knn_score")
