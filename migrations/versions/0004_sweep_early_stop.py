"""a sweep's early stopping (asynchronous successive halving)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 07:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    # NULL for every existing sweep: none of them stops trials early.
    with op.batch_alter_table("sweeps") as batch:
        batch.add_column(sa.Column("early_stop", JSON_DOC, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sweeps") as batch:
        batch.drop_column("early_stop")
