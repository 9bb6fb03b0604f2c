"""project quotas, and what each job holds while it runs

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 04:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 1000


def upgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("max_running", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_cpus", sa.Double(), nullable=True))
        batch.add_column(sa.Column("max_gpus", sa.Double(), nullable=True))
        batch.add_column(sa.Column("max_priority", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_queued", sa.Integer(), nullable=True))
    # The trainer's defaults (1 CPU, no GPU, one worker), spelled out here so that this
    # revision never changes; rows whose config says otherwise are rewritten below.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("cpus", sa.Double(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("gpus", sa.Double(), nullable=False, server_default="0"))
    _backfill()
    with op.batch_alter_table("jobs") as batch:  # new rows always say (repo.new_job_values)
        batch.alter_column("cpus", server_default=None)
        batch.alter_column("gpus", server_default=None)
    op.create_index("ix_jobs_running_project", "jobs", ["state", "project_id"], unique=False)


def _backfill() -> None:
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("config", sa.JSON), sa.column("cpus", sa.Double), sa.column("gpus", sa.Double))
    bind = op.get_bind()
    last = ""
    while True:
        rows = bind.execute(sa.select(jobs.c.id, jobs.c.config).where(jobs.c.id > last).order_by(jobs.c.id).limit(BATCH)).all()
        if not rows:
            return
        updates = []
        for job_id, config in rows:
            resources = (config or {}).get("resources") or {}
            workers = int(resources.get("workers", 1))
            cpus, gpus = float(resources.get("cpus", 1)) * workers, float(resources.get("gpus", 0)) * workers
            if (cpus, gpus) != (1.0, 0.0):
                updates.append({"job": job_id, "c": cpus, "g": gpus})
        if updates:
            bind.execute(jobs.update().where(jobs.c.id == sa.bindparam("job")).values(cpus=sa.bindparam("c"), gpus=sa.bindparam("g")), updates)
        last = rows[-1][0]


def downgrade() -> None:
    op.drop_index("ix_jobs_running_project", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("gpus")
        batch.drop_column("cpus")
    with op.batch_alter_table("projects") as batch:
        for name in ("max_queued", "max_priority", "max_gpus", "max_cpus", "max_running"):
            batch.drop_column(name)
