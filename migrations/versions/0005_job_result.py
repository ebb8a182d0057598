"""Job result: what a job leaves (an upload's score) gets a column of its own instead of a key in its payload.

Upgrade moves the results that earlier workers wrote into `payload["result"]` into the column; downgrade moves
them back, so neither direction loses one.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_jobs = sa.table("jobs", sa.column("id", sa.Integer()), sa.column("payload", sa.JSON()),
                 sa.column("result", sa.JSON()))


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("result", sa.JSON(), nullable=True))
    bind = op.get_bind()
    for job_id, payload in bind.execute(sa.select(_jobs.c.id, _jobs.c.payload)).all():
        if isinstance(payload, dict) and "result" in payload:
            rest = {k: v for k, v in payload.items() if k != "result"}
            bind.execute(_jobs.update().where(_jobs.c.id == job_id).values(payload=rest, result=payload["result"]))


def downgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.select(_jobs.c.id, _jobs.c.payload, _jobs.c.result).where(_jobs.c.result.is_not(None))).all()
    for job_id, payload, result in rows:
        bind.execute(_jobs.update().where(_jobs.c.id == job_id).values(payload={**(payload or {}), "result": result}))
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("result")
