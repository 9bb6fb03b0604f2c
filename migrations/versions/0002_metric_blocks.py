"""metric blocks: per-64-step extremes of each series, for fast downsampled reads

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 23:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BLOCK_STEPS = 64  # spelled out here, not imported from the models, so this revision never changes


def upgrade() -> None:
    op.create_table('metric_blocks',
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('block', sa.BigInteger(), nullable=False),
    sa.Column('low_step', sa.BigInteger(), nullable=True),
    sa.Column('low_value', sa.Double(), nullable=True),
    sa.Column('high_step', sa.BigInteger(), nullable=True),
    sa.Column('high_value', sa.Double(), nullable=True),
    sa.Column('null_step', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('job_id', 'name', 'block', name=op.f('pk_metric_blocks')),
    sqlite_with_rowid=False
    )
    _backfill()


def _backfill() -> None:
    """Summarise the points already stored, so existing series read fast too."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "INSERT INTO metric_blocks (job_id, name, block, low_step, low_value, high_step, high_value, null_step)"
            " SELECT job_id, name, block, low[2]::bigint, low[1], high[2]::bigint, high[1], null_step FROM ("
            f" SELECT job_id, name, step / {BLOCK_STEPS} AS block,"
            " min(ARRAY[value, step::float8]) FILTER (WHERE value IS NOT NULL) AS low,"
            " max(ARRAY[value, step::float8]) FILTER (WHERE value IS NOT NULL) AS high,"
            " min(step) FILTER (WHERE value IS NULL) AS null_step"
            f" FROM metrics GROUP BY job_id, name, step / {BLOCK_STEPS}) AS s"
        )
        return
    # SQLite: the bare step column comes from the row holding the group's min() / max().
    block = f"step / {BLOCK_STEPS}"
    op.execute(
        "INSERT INTO metric_blocks (job_id, name, block, null_step)"
        f" SELECT job_id, name, {block}, min(CASE WHEN value IS NULL THEN step END) FROM metrics GROUP BY job_id, name, {block}"
    )
    for side, aggregate in (("low", "min"), ("high", "max")):
        op.execute(
            f"UPDATE metric_blocks SET {side}_step = e.step, {side}_value = e.value FROM"
            f" (SELECT job_id, name, {block} AS block, step, {aggregate}(value) AS value FROM metrics"
            f" WHERE value IS NOT NULL GROUP BY job_id, name, {block}) AS e"
            " WHERE e.job_id = metric_blocks.job_id AND e.name = metric_blocks.name AND e.block = metric_blocks.block"
        )


def downgrade() -> None:
    op.drop_table('metric_blocks')
