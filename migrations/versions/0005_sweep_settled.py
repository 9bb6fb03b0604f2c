"""a sweep that stops early is settled once its rule can resume no paused trial

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 18:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL for every existing sweep: the dispatchers' reconciler decides each early-stopping
    # one once more (service.store.db.early_stop.unsettled) and settles it.
    with op.batch_alter_table("sweeps") as batch:
        batch.add_column(sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sweeps") as batch:
        batch.drop_column("settled_at")
