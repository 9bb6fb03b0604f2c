"""Jobs: the one way to build and insert a job row, reads and listings, the queries of
dispatch, and service-wide counts."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from service.store.db.base import new_id, utcnow
from service.store.db.errors import IllegalTransition, NotFound
from service.store.db.models import (
    TERMINAL_STATES,
    Attempt,
    Checkpoint,
    Job,
    JobLog,
    JobState,
    Metric,
    MetricBlock,
)
from service.store.db.repo.common import get_owned
from service.store.db.rules import claimable
from service.store.quotas import Usage
from trainer.config import JobConfig, ResourcesConfig


def create_job(session: Session, **fields: Any) -> tuple[Job, bool]:
    """Insert a queued job (the fields of new_job_values) through the ORM session, and
    return it as a Job. With an idempotency key already used in this project, the existing
    job is returned instead. Returns (job, created). The same row and the same statement as
    the API's hot path (insert_job): there is one way to create a job."""
    job, created = insert_job(session, new_job_values(**fields))
    if created:
        job = session.get(Job, job.id)
    return job, created


def get_job_by_idempotency_key(session: Session, project_id: str, key: str) -> Job | None:
    return session.execute(
        sa.select(Job).where(Job.project_id == project_id, Job.idempotency_key == key)
    ).scalar_one_or_none()



def get_job(session: Session, job_id: str, project_id: str | None = None) -> Job:
    return get_owned(session, Job, "job", job_id, project_id)


def _encode_cursor(created_at: datetime, object_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{object_id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        stamp, object_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(stamp), object_id
    except Exception as exc:
        raise ValueError("invalid cursor") from exc


def _tag_filter(session: Session, tag: str) -> sa.ColumnElement[bool]:
    if session.get_bind().dialect.name == "postgresql":
        return Job.tags.op("@>")(sa.cast([tag], postgresql.JSONB))
    each = sa.func.json_each(Job.tags).table_valued("value")
    return sa.exists(sa.select(1).select_from(each).where(each.c.value == tag))


def get_job_if_claimable(session: Session, job_id: str, *, now: datetime | None = None) -> tuple[Job, bool]:
    """The job, and whether a worker may claim it now (rules.claimable, read in the same
    query). NotFound if there is no such job."""
    row = session.execute(sa.select(Job, claimable(now or utcnow())).where(Job.id == job_id)).first()
    if row is None:
        raise NotFound("job", job_id)
    return row[0], bool(row[1])


def list_jobs(
    session: Session,
    project_id: str,
    *,
    state: JobState | None = None,
    sweep_id: str | None = None,
    tag: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Job], str | None]:
    """A page of the project's jobs, newest first, and the cursor of the next page (None at
    the end). Raises ValueError for a malformed cursor."""
    stmt = sa.select(Job).where(Job.project_id == project_id)
    if state is not None:
        stmt = stmt.where(Job.state == JobState(state))
    if sweep_id is not None:
        stmt = stmt.where(Job.sweep_id == sweep_id)
    if tag is not None:
        stmt = stmt.where(_tag_filter(session, tag))
    if cursor is not None:
        created_at, job_id = _decode_cursor(cursor)
        stmt = stmt.where(
            sa.or_(Job.created_at < created_at, sa.and_(Job.created_at == created_at, Job.id < job_id))
        )
    jobs = list(session.execute(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).scalars())
    if len(jobs) > limit:
        jobs = jobs[:limit]
        return jobs, _encode_cursor(jobs[-1].created_at, jobs[-1].id)
    return jobs, None


def count_queued(session: Session, project_id: str) -> int:
    """For the per-project quota (UNROLL_MAX_QUEUED_PER_PROJECT)."""
    return session.execute(
        sa.select(sa.func.count()).where(Job.project_id == project_id, Job.state == JobState.QUEUED)
    ).scalar_one()


def queued_job_ids(session: Session, *, limit: int = 10_000) -> list[str]:
    """Queued jobs in dispatch order: what the reconciler compares with the Redis queue."""
    return list(
        session.execute(
            sa.select(Job.id)
            .where(Job.state == JobState.QUEUED)
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(limit)
        ).scalars()
    )


def set_pending_reason(session: Session, job_id: str, reason: str | None) -> bool:
    """Say why a queued job cannot be placed yet (None clears it). False if not queued."""
    result = session.execute(
        sa.update(Job)
        .where(Job.id == job_id, Job.state == JobState.QUEUED)
        .values(pending_reason=reason)
        .execution_options(synchronize_session="fetch")
    )
    return result.rowcount == 1


# -- dispatch ---------------------------------------------------------------------------


def dispatchable_jobs(session: Session, *, now: datetime | None = None, limit: int = 10_000) -> list[tuple[str, int, str]]:
    """(id, priority, project id) of queued jobs that may be claimed now, in dispatch order: what the
    reconciler makes sure the Redis queue holds (backing-off jobs join when they are due)."""
    now = now or utcnow()
    rows = session.execute(
        sa.select(Job.id, Job.priority, Job.project_id)
        .where(claimable(now))
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
        .limit(limit)
    ).all()
    return [(row.id, row.priority, row.project_id) for row in rows]


def cancel_overdue(session: Session, job_ids: Iterable[str], *, grace_seconds: float, now: datetime | None = None) -> list[tuple[str, int]]:
    """(id, attempt) of running jobs among `job_ids` whose cancel request is older than the
    grace period: their attempts ignored it and are to be stopped by force."""
    now = now or utcnow()
    ids = list(job_ids)
    if not ids:
        return []
    rows = session.execute(
        sa.select(Job.id, Job.attempt).where(
            Job.id.in_(ids),
            Job.state == JobState.RUNNING,
            Job.cancel_requested_at <= now - timedelta(seconds=grace_seconds),
        )
    ).all()
    return [(row.id, row.attempt) for row in rows]


def project_usage(session: Session) -> dict[str, Usage]:
    """What each project's running jobs hold now (every dispatcher's): fair share and
    quotas. One GROUP BY over the running jobs (ix_jobs_running_project)."""
    rows = session.execute(
        sa.select(Job.project_id, sa.func.count(), sa.func.sum(Job.cpus), sa.func.sum(Job.gpus))
        .where(Job.state == JobState.RUNNING)
        .group_by(Job.project_id)
    ).all()
    return {project: Usage(count, float(cpus or 0.0), float(gpus or 0.0)) for project, count, cpus, gpus in rows}


def count_queued_by_project(session: Session) -> dict[str, int]:
    rows = session.execute(sa.select(Job.project_id, sa.func.count()).where(Job.state == JobState.QUEUED).group_by(Job.project_id)).all()
    return {project: count for project, count in rows}


def set_project_pending_reason(session: Session, project_id: str, reason: str | None, *, replacing: str | None = None) -> int:
    """Say `reason` on every queued job of the project (the project is at its quota), or,
    with `replacing`, only on those that say `replacing` (None and replacing: the quota
    no longer holds them back). Returns the rows changed."""
    stmt = sa.update(Job).where(Job.project_id == project_id, Job.state == JobState.QUEUED)
    if replacing is not None:
        stmt = stmt.where(Job.pending_reason == replacing)
    elif reason is not None:
        stmt = stmt.where(sa.or_(Job.pending_reason.is_(None), Job.pending_reason != reason))
    result = session.execute(stmt.values(pending_reason=reason).execution_options(synchronize_session=False))
    return result.rowcount


# --- service-wide counts (the API's /metrics) --------------------------------------------


def count_jobs_by_state(session: Session) -> dict[JobState, int]:
    """Jobs of every project per state, for the Prometheus gauge read at scrape time."""
    rows = session.execute(sa.select(Job.state, sa.func.count()).group_by(Job.state)).all()
    return {state: count for state, count in rows}


# The columns a new job is inserted with; every other column of `jobs` starts NULL.
JOB_INSERT_COLUMNS = (
    "id", "project_id", "sweep_id", "name", "tags", "config", "state", "priority", "cpus", "gpus", "attempt",
    "max_attempts", "retry_base", "step", "max_steps", "progress", "idempotency_key",
    "created_at", "updated_at",
)


_CONFIG_DEFAULTS = JobConfig.model_fields


def new_job_values(
    *,
    project_id: str,
    config: Mapping[str, Any],
    name: str | None = None,
    tags: Sequence[str] = (),
    priority: int = _CONFIG_DEFAULTS["priority"].default,
    max_attempts: int = _CONFIG_DEFAULTS["max_attempts"].default,
    max_steps: int | None = None,
    idempotency_key: str | None = None,
    sweep_id: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The row of a new queued job, keyed by JOB_INSERT_COLUMNS (with a fresh id): the one
    place a job row is built. The fields that come from the job's config default to the
    config schema's own defaults."""
    now = now or utcnow()
    cpus, gpus = held_resources(config)
    return {
        "id": new_id("job"),
        "project_id": project_id,
        "sweep_id": sweep_id,
        "name": name,
        "tags": list(tags),
        "config": dict(config),
        "state": JobState.QUEUED,
        "priority": priority,
        "cpus": cpus,
        "gpus": gpus,
        "attempt": 0,
        "max_attempts": max_attempts,
        "retry_base": 0,
        "step": 0,
        "max_steps": max_steps,
        "progress": 0.0,
        "idempotency_key": idempotency_key,
        "created_at": now,
        "updated_at": now,
    }


def held_resources(config: Mapping[str, Any]) -> tuple[float, float]:
    """(CPUs, GPUs) a job of this (validated) config holds while it runs, all its workers
    together, with the trainer's defaults for what it leaves out."""
    resources = ResourcesConfig.model_validate(config.get("resources") or {})
    return resources.cpus * resources.workers, resources.gpus * resources.workers


def new_job_row(values: Mapping[str, Any]) -> Any:
    """What the database holds for a job just inserted with `values`: those values, NULL in
    every other column (no column of `jobs` has a server default). Read like a Job."""
    row = dict.fromkeys(Job.__table__.c.keys())
    row.update(values)
    return SimpleNamespace(**row)


def insert_job(session: Session, values: Mapping[str, Any]) -> tuple[Any, bool]:
    """create_job in one statement, for the API's hot path: INSERT … ON CONFLICT (project,
    Idempotency-Key) DO NOTHING RETURNING id, so it needs no savepoint and, run on an
    autocommit connection, is a whole transaction in one round trip. A key already used
    returns the existing job (also when two submissions race). `values` come from
    new_job_values. Returns (job, created)."""
    dialect = session.get_bind().dialect.name
    stmt = _INSERT_JOB.get(dialect)
    if stmt is None:
        stmt = _INSERT_JOB[dialect] = _insert_job_statement(dialect)
    if session.execute(stmt, values).first() is not None:
        return new_job_row(values), True
    return existing_job_for_key(session, values["project_id"], values["idempotency_key"]), False


def existing_job_for_key(session: Session, project_id: str, idempotency_key: str) -> Job:
    """The job that won a conflict on (project, Idempotency-Key)."""
    existing = get_job_by_idempotency_key(session, project_id, idempotency_key)
    if existing is None:  # deleted between the conflict and the read: vanishingly rare
        raise NotFound("job", f"idempotency key {idempotency_key!r}")
    return existing


# One statement per dialect, built once with a bind parameter per column: executing it only
# binds values (no per-request statement construction or cache-key computation).
_INSERT_JOB: dict[str, Any] = {}


def _insert_job_statement(dialect: str) -> Any:
    from sqlalchemy.dialects import sqlite

    table = Job.__table__
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table).values({c: sa.bindparam(c, type_=table.c[c].type) for c in JOB_INSERT_COLUMNS})
    # NULL keys never conflict, so one statement serves submissions with and without a key.
    stmt = stmt.on_conflict_do_nothing(index_elements=["project_id", "idempotency_key"])
    return stmt.returning(table.c.id)


# --- deletion (DELETE /v1/jobs/{id}) ---------------------------------------------------------

# Everything recorded about a job, besides its row. metrics and metric_blocks have no foreign
# key (see their models), so no cascade reaches them: each table is deleted explicitly.
_JOB_CHILDREN = (Metric, MetricBlock, JobLog, Checkpoint, Attempt)


def delete_job(session: Session, job_id: str, project_id: str | None = None) -> list[str]:
    """Delete a job that has ended and everything recorded about it (attempts, checkpoint
    records, log lines, metric points and blocks). Returns the URIs of its checkpoint files,
    which the caller removes after the commit: a file that cannot be removed is an orphan,
    never a row that points at nothing.

    NotFound for an unknown job or another project's. IllegalTransition while it is queued
    or running (its attempt would go on writing): cancel it first. The DELETE itself is
    conditional on a final state, so a concurrent retry either happens before (409) or finds
    no job."""
    job = get_job(session, job_id, project_id)
    if not JobState(job.state).terminal:
        raise IllegalTransition(job_id, JobState(job.state).value, "delete a job that has not ended: cancel it first")
    uris = list(session.execute(sa.select(Checkpoint.uri).where(Checkpoint.job_id == job_id)).scalars())
    deleted = session.execute(
        sa.delete(Job).where(Job.id == job_id, Job.state.in_(TERMINAL_STATES)).execution_options(synchronize_session=False)
    ).rowcount
    if deleted != 1:  # retried (or deleted) since it was read
        current = session.execute(sa.select(Job.state).where(Job.id == job_id)).scalar_one_or_none()
        if current is None:
            raise NotFound("job", job_id)
        raise IllegalTransition(job_id, JobState(current).value, "delete a job that has not ended: cancel it first")
    for table in _JOB_CHILDREN:
        session.execute(sa.delete(table).where(table.job_id == job_id).execution_options(synchronize_session=False))
    session.expunge(job)
    return uris
