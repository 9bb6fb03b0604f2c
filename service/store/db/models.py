"""The tables of unroll (SPEC §4, §5). Only the schema lives here: state changes of a job
go through service.store.db.states, queries through service.store.db.repo."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship, synonym

from service.store.db.base import (
    ID_LENGTH,
    Base,
    BigIntPK,
    JSONDoc,
    UTCDateTime,
    new_id,
    utcnow,
)
from service.store.lifecycle import TERMINAL_STATES, AttemptOutcome, JobState

__all__ = ["TERMINAL_STATES", "AttemptOutcome", "JobState"]  # re-exported: the tables' enums


def _enum(cls: type[enum.Enum], name: str) -> sa.Enum:
    # Stored as a short string with a CHECK constraint (not a native PostgreSQL enum), so
    # adding a state later is a constraint change, not an ALTER TYPE.
    return sa.Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(sa.String(ID_LENGTH), primary_key=True, default=lambda: new_id("project"))
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The project's quota (service.store.quotas.Quota); NULL: the deployment's default.
    max_running: Mapped[int | None]
    max_cpus: Mapped[float | None] = mapped_column(sa.Double)
    max_gpus: Mapped[float | None] = mapped_column(sa.Double)
    max_priority: Mapped[int | None]
    max_queued: Mapped[int | None]


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(sa.String(ID_LENGTH), primary_key=True, default=lambda: new_id("token"))
    project_id: Mapped[str] = mapped_column(sa.ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    # sha256 hex of the secret; the secret itself is shown once and never stored.
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    name: Mapped[str | None] = mapped_column(sa.String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    project: Mapped[Project] = relationship(lazy="raise")


class Sweep(Base):
    """A grid of jobs submitted together. Its state is derived from its jobs' states."""

    __tablename__ = "sweeps"
    __table_args__ = (sa.Index(None, "project_id", "created_at"),)

    id: Mapped[str] = mapped_column(sa.String(ID_LENGTH), primary_key=True, default=lambda: new_id("sweep"))
    project_id: Mapped[str] = mapped_column(sa.ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str | None] = mapped_column(sa.String(200))
    base: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    # {dotted.path: [values]}
    grid: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    seeds: Mapped[int] = mapped_column(default=1)
    # At most this many of its jobs run at once (None: no limit beyond the cluster's).
    max_parallel: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The sweep body's early_stop, defaults filled in (None: every trial runs to its end).
    early_stop: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=True)
    # When its early stopping last found nothing to resume and no trial queued or running
    # (service.store.db.early_stop.decide); None while a paused trial may still go on.
    settled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Job(Base):
    # Rows are built in one place, service.store.db.repo.jobs.new_job_values (the API's
    # group-committed insert and create_job both use it): no column has a default here.
    __tablename__ = "jobs"
    __table_args__ = (
        # One submission per (project, Idempotency-Key); NULL keys never collide.
        sa.UniqueConstraint("project_id", "idempotency_key"),
        sa.Index(None, "project_id", "created_at"),
        sa.Index(None, "sweep_id"),
        sa.CheckConstraint("attempt >= 0", name="attempt_nonnegative"),
        sa.CheckConstraint("max_attempts >= 1", name="max_attempts_positive"),
    )

    id: Mapped[str] = mapped_column(sa.String(ID_LENGTH), primary_key=True)
    project_id: Mapped[str] = mapped_column(sa.ForeignKey("projects.id", ondelete="CASCADE"))
    sweep_id: Mapped[str | None] = mapped_column(sa.ForeignKey("sweeps.id", ondelete="SET NULL"))
    name: Mapped[str | None] = mapped_column(sa.String(200))
    tags: Mapped[list[str]] = mapped_column(JSONDoc)
    # The job configuration (SPEC §2) as submitted and validated.
    config: Mapped[dict[str, Any]] = mapped_column(JSONDoc)

    state: Mapped[JobState] = mapped_column(_enum(JobState, "state"))
    priority: Mapped[int]
    # What the job holds while it runs, all its workers together (resources.cpus and
    # .gpus times .workers): a project's usage is a SUM over its running jobs.
    cpus: Mapped[float] = mapped_column(sa.Double)
    gpus: Mapped[float] = mapped_column(sa.Double)
    # Number of the latest try: 0 before the first claim, +1 at every claim. Monotonic, so
    # an old attempt can never pass the fence again (also across retries).
    attempt: Mapped[int]
    max_attempts: Mapped[int]
    # `attempt` when the job was last retried by a user: only tries after it count
    # against max_attempts.
    retry_base: Mapped[int]
    # The worker of the current (or last) attempt; SPEC's `worker`.
    lease_owner: Mapped[str | None] = mapped_column(sa.String(200))
    worker = synonym("lease_owner")
    # Set only while running: past it, the attempt is presumed lost.
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    step: Mapped[int] = mapped_column(sa.BigInteger)
    max_steps: Mapped[int | None] = mapped_column(sa.BigInteger)
    progress: Mapped[float]
    error: Mapped[str | None] = mapped_column(sa.Text)
    # Why a queued job cannot be placed yet (e.g. "needs 1 GPU; no GPU node"), for users.
    pending_reason: Mapped[str | None] = mapped_column(sa.Text)
    # The final summary the trainer reported (SPEC §6 `--json` fields).
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(255))
    # When cancellation was asked for; a running attempt observes it and finishes cancelled.
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Not claimable before this time (backoff after a lost attempt).
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Start of the current (or last) attempt; the attempts table keeps every start.
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, onupdate=utcnow)


# The dispatch order: highest priority first, then oldest (claim_next, queued_job_ids).
sa.Index("ix_jobs_dispatch", Job.state, Job.priority.desc(), Job.created_at)
# What each project's running jobs hold (repo.project_usage: fair share and quotas).
sa.Index("ix_jobs_running_project", Job.state, Job.project_id)


class Attempt(Base):
    """One try of a job: inserted when it is claimed, closed when it ends."""

    __tablename__ = "attempts"

    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(primary_key=True)
    worker: Mapped[str | None] = mapped_column(sa.String(200))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[AttemptOutcome | None] = mapped_column(_enum(AttemptOutcome, "outcome"))
    error: Mapped[str | None] = mapped_column(sa.Text)


class Metric(Base):
    """One point of one series. A later attempt that recomputes a step overwrites it."""

    __tablename__ = "metrics"
    __table_args__ = (
        # A series is read as one key range: the key covers `value` on PostgreSQL (index-only
        # scans) and the table is clustered on it on SQLite, so a read never visits rows of
        # other series.
        sa.PrimaryKeyConstraint("job_id", "name", "step", postgresql_include=["value"]),
        {"sqlite_with_rowid": False},
    )

    # No foreign key, on purpose: its per-row check doubled the cost of a batch insert on
    # PostgreSQL, and every write is already fenced on the job row (which must exist and is
    # share-locked for the insert). Deleting a job must delete its metrics explicitly.
    job_id: Mapped[str] = mapped_column(sa.String(ID_LENGTH))
    name: Mapped[str] = mapped_column(sa.String(200))
    step: Mapped[int] = mapped_column(sa.BigInteger)
    attempt: Mapped[int]
    # NULL for nan / inf: kept as a point, never dropped (SPEC §3).
    value: Mapped[float | None] = mapped_column(sa.Double)
    # Seconds since the epoch when the point was measured.
    wall_time: Mapped[float | None] = mapped_column(sa.Double)


# Steps per metric block: a block summarises BLOCK_STEPS consecutive steps of a series.
METRIC_BLOCK_STEPS = 64


class MetricBlock(Base):
    """The extremes of one block of a series: steps [block·64, block·64 + 63] (steps are
    never negative). Its lowest and highest finite points and its first non-finite one,
    kept exact by every metrics write (repo.insert_metrics recomputes the blocks a batch
    touched, in the same transaction). A downsampled read of a long series aggregates
    blocks instead of points: 1/64 of the rows, with the same min/max guarantee."""

    __tablename__ = "metric_blocks"
    __table_args__ = (
        sa.PrimaryKeyConstraint("job_id", "name", "block"),
        {"sqlite_with_rowid": False},
    )

    job_id: Mapped[str] = mapped_column(sa.String(ID_LENGTH))
    name: Mapped[str] = mapped_column(sa.String(200))
    block: Mapped[int] = mapped_column(sa.BigInteger)
    # NULL when the block has no finite point (low/high) or no non-finite one (null_step).
    low_step: Mapped[int | None] = mapped_column(sa.BigInteger)
    low_value: Mapped[float | None] = mapped_column(sa.Double)
    high_step: Mapped[int | None] = mapped_column(sa.BigInteger)
    high_value: Mapped[float | None] = mapped_column(sa.Double)
    null_step: Mapped[int | None] = mapped_column(sa.BigInteger)


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    attempt: Mapped[int]
    uri: Mapped[str] = mapped_column(sa.Text)
    bytes: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobLog(Base):
    __tablename__ = "job_logs"
    __table_args__ = (sa.Index(None, "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int]
    ts: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    level: Mapped[str] = mapped_column(sa.String(16), default="info")
    line: Mapped[str] = mapped_column(sa.Text)


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (sa.Index(None, "project_id", "created_at"),)

    id: Mapped[str] = mapped_column(sa.String(ID_LENGTH), primary_key=True, default=lambda: new_id("dataset"))
    project_id: Mapped[str] = mapped_column(sa.ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(sa.String(255))
    sha256: Mapped[str] = mapped_column(sa.String(64))
    bytes: Mapped[int] = mapped_column(sa.BigInteger)
    uri: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
