"""Queries and writes of the service, one function per question. Each takes a sync Session
and never commits: the caller owns the transaction (``session_scope``, or
``await async_session.run_sync(fn, ...)`` from async code). Job state changes are not
here: they belong to service.db.states.

Writes made on behalf of an attempt (metrics, checkpoints, log lines) are fenced: each
is a single ``INSERT … SELECT … WHERE EXISTS (the job runs this attempt)`` statement, so a
stale attempt's write is refused (StaleAttempt) and never half-applied, with no window
between the check and the write.
"""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any, NamedTuple

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.base import UTCDateTime, new_id, utcnow
from service.db.errors import NotFound, StaleAttempt
from service.db.models import (
    ApiToken,
    Attempt,
    Checkpoint,
    Dataset,
    Job,
    JobLog,
    JobState,
    METRIC_BLOCK_STEPS,
    Metric,
    Project,
    Sweep,
)

# --- projects and tokens ------------------------------------------------------------------


def get_project(session: Session, project_id: str) -> Project:
    project = session.get(Project, project_id)
    if project is None:
        raise NotFound("project", project_id)
    return project


def get_or_create_project(session: Session, name: str) -> Project:
    """The project called `name`, created if needed (safe when two callers race)."""
    found = session.execute(sa.select(Project).where(Project.name == name)).scalar_one_or_none()
    if found is not None:
        return found
    try:
        with session.begin_nested():
            project = Project(id=new_id("project"), name=name)
            session.add(project)
        return project
    except IntegrityError:
        return session.execute(sa.select(Project).where(Project.name == name)).scalar_one()


TOKEN_PREFIX = "unroll_"


def hash_token(token: str) -> str:
    """Tokens are stored as sha256 hex: they are long random secrets, so a fast hash is
    enough (no salt or slow KDF needed), and lookup is by equality on the hash."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    session: Session, project_id: str, *, name: str | None = None, expires_at: datetime | None = None
) -> tuple[str, ApiToken]:
    """A new token for the project: (the secret, shown once; its row)."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        id=new_id("token"), project_id=project_id, token_hash=hash_token(secret), name=name, expires_at=expires_at
    )
    session.add(row)
    session.flush()
    return secret, row


# Write `last_used_at` at most this often: a token is used on every request.
_TOKEN_TOUCH_INTERVAL = timedelta(seconds=60)


def authenticate(session: Session, token: str, *, now: datetime | None = None) -> ApiToken | None:
    """The live (not revoked, not expired) token row for a secret, or None."""
    now = now or utcnow()
    row = session.execute(
        sa.select(ApiToken).where(
            ApiToken.token_hash == hash_token(token),
            ApiToken.revoked_at.is_(None),
            sa.or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > now),
        )
    ).scalar_one_or_none()
    if row is not None and (row.last_used_at is None or now - row.last_used_at >= _TOKEN_TOUCH_INTERVAL):
        row.last_used_at = now
    return row


def revoke_token(session: Session, token_id: str, *, now: datetime | None = None) -> bool:
    result = session.execute(
        sa.update(ApiToken)
        .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=now or utcnow())
    )
    return result.rowcount == 1


# --- jobs ---------------------------------------------------------------------------------


def create_job(
    session: Session,
    *,
    project_id: str,
    config: Mapping[str, Any],
    name: str | None = None,
    tags: Sequence[str] = (),
    priority: int = 0,
    max_attempts: int = 3,
    max_steps: int | None = None,
    idempotency_key: str | None = None,
    sweep_id: str | None = None,
) -> tuple[Job, bool]:
    """Insert a queued job. With an idempotency key already used in this project, the
    existing job is returned instead. Returns (job, created)."""
    if idempotency_key is not None:
        existing = get_job_by_idempotency_key(session, project_id, idempotency_key)
        if existing is not None:
            return existing, False
    job = Job(
        id=new_id("job"),
        project_id=project_id,
        config=dict(config),
        name=name,
        tags=list(tags),
        priority=priority,
        max_attempts=max_attempts,
        max_steps=max_steps,
        idempotency_key=idempotency_key,
        sweep_id=sweep_id,
        state=JobState.QUEUED,
    )
    if idempotency_key is None:
        session.add(job)
        session.flush()
        return job, True
    try:
        with session.begin_nested():  # a concurrent submission with the same key may win
            session.add(job)
        return job, True
    except IntegrityError:
        existing = get_job_by_idempotency_key(session, project_id, idempotency_key)
        if existing is None:
            raise
        return existing, False


def get_job_by_idempotency_key(session: Session, project_id: str, key: str) -> Job | None:
    return session.execute(
        sa.select(Job).where(Job.project_id == project_id, Job.idempotency_key == key)
    ).scalar_one_or_none()


def _get_owned(session: Session, model: Any, kind: str, object_id: str, project_id: str | None) -> Any:
    """The `model` row `object_id`; NotFound when unknown or (with project_id) another
    project's: the same answer, so an id of another project reveals nothing."""
    stmt = sa.select(model).where(model.id == object_id)
    if project_id is not None:
        stmt = stmt.where(model.project_id == project_id)
    found = session.execute(stmt).scalar_one_or_none()
    if found is None:
        raise NotFound(kind, object_id)
    return found


def get_job(session: Session, job_id: str, project_id: str | None = None) -> Job:
    return _get_owned(session, Job, "job", job_id, project_id)


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


def list_attempts(session: Session, job_id: str) -> list[Attempt]:
    return list(session.execute(sa.select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)).scalars())


# --- sweeps -------------------------------------------------------------------------------


def create_sweep(
    session: Session,
    *,
    project_id: str,
    base: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    seeds: int = 1,
    max_parallel: int | None = None,
    name: str | None = None,
) -> Sweep:
    """The sweep row; its jobs are created with create_job(..., sweep_id=sweep.id)."""
    sweep = Sweep(
        id=new_id("sweep"),
        project_id=project_id,
        base=dict(base),
        grid={k: list(v) for k, v in grid.items()},
        seeds=seeds,
        max_parallel=max_parallel,
        name=name,
    )
    session.add(sweep)
    session.flush()
    return sweep


def get_sweep(session: Session, sweep_id: str, project_id: str | None = None) -> Sweep:
    return _get_owned(session, Sweep, "sweep", sweep_id, project_id)


def list_sweep_jobs(session: Session, sweep_id: str) -> list[Job]:
    return list(
        session.execute(sa.select(Job).where(Job.sweep_id == sweep_id).order_by(Job.created_at, Job.id)).scalars()
    )


def sweep_state_counts(session: Session, sweep_id: str) -> dict[JobState, int]:
    rows = session.execute(
        sa.select(Job.state, sa.func.count()).where(Job.sweep_id == sweep_id).group_by(Job.state)
    ).all()
    return {state: count for state, count in rows}


def count_running_in_sweep(session: Session, sweep_id: str) -> int:
    """For max_parallel: how many of the sweep's jobs run now."""
    return session.execute(
        sa.select(sa.func.count()).where(Job.sweep_id == sweep_id, Job.state == JobState.RUNNING)
    ).scalar_one()


def sweep_state(counts: Mapping[JobState, int]) -> str:
    """A sweep's state, derived from its jobs' states: running while any job is unfinished
    and some started; queued when none started; when all finished, failed if any failed,
    else cancelled if any was cancelled, else succeeded."""
    live = {state: n for state, n in counts.items() if n}
    if not live or set(live) == {JobState.QUEUED}:
        return JobState.QUEUED.value
    if JobState.QUEUED in live or JobState.RUNNING in live:
        return JobState.RUNNING.value
    for state in (JobState.FAILED, JobState.CANCELLED):
        if state in live:
            return state.value
    return JobState.SUCCEEDED.value


# --- datasets -----------------------------------------------------------------------------


def create_dataset(
    session: Session, *, project_id: str, name: str, sha256: str, bytes: int, uri: str
) -> Dataset:
    dataset = Dataset(id=new_id("dataset"), project_id=project_id, name=name, sha256=sha256, bytes=bytes, uri=uri)
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, dataset_id: str, project_id: str | None = None) -> Dataset:
    return _get_owned(session, Dataset, "dataset", dataset_id, project_id)


def list_datasets(session: Session, project_id: str, *, limit: int = 100) -> list[Dataset]:
    return list(
        session.execute(
            sa.select(Dataset)
            .where(Dataset.project_id == project_id)
            .order_by(Dataset.created_at.desc(), Dataset.id.desc())
            .limit(limit)
        ).scalars()
    )


# --- fenced writes: metrics, checkpoints, logs --------------------------------------------


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _fence_sql(session: Session, job_id: str = "CAST(:job_id AS VARCHAR)", attempt: str = "CAST(:attempt AS INTEGER)") -> str:
    # `job_id` and `attempt` are the placeholders of the statement's driver.
    # FOR SHARE (PostgreSQL) holds the job row until our transaction ends, so a concurrent
    # requeue/finish waits for this write instead of slipping in between check and commit.
    # SQLite needs nothing: the writer holds the database lock for the whole statement.
    lock = " FOR SHARE" if _is_postgres(session) else ""
    return (
        f"EXISTS (SELECT 1 FROM jobs WHERE jobs.id = {job_id}"
        f" AND jobs.attempt = {attempt}"
        f" AND jobs.state = '{JobState.RUNNING.value}'{lock})"
    )


def _fence(job_id: str, attempt: int, session: Session) -> sa.Exists:
    check = sa.select(1).where(Job.id == job_id, Job.attempt == attempt, Job.state == JobState.RUNNING)
    if _is_postgres(session):
        check = check.with_for_update(read=True)
    return sa.exists(check)


# SQLAlchemy reports rowcount reliably for INSERT only when asked to keep it.
_ROWCOUNT = {"preserve_rowcount": True}


class MetricPoint(NamedTuple):
    name: str
    step: int
    value: float | None
    wall_time: float | None = None


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def insert_metrics(
    session: Session, job_id: str, attempt: int, points: Iterable[MetricPoint | tuple[Any, ...]]
) -> int:
    """Write a batch of points `(name, step, value[, wall_time])` for the running attempt.

    nan and ±inf are stored as NULL (SPEC §3). A point that already exists (the same
    step recomputed after a resume) is overwritten. PostgreSQL with psycopg (the workers):
    the batch is COPYed into a connection-local staging table and moved into `metrics` by
    one fenced INSERT … SELECT (measured about three times faster than one multi-row
    INSERT of the same batch, which remains the path under asyncpg); SQLite: one
    executemany. Returns the number of points written; raises StaleAttempt if
    the attempt is not running.
    """
    batch: dict[tuple[str, int], tuple[float | None, float | None]] = {}
    for point in points:
        name, step, value = point[0], int(point[1]), point[2]
        if step < 0:
            raise ValueError(f"metric {name!r}: step must be >= 0 (got {step})")
        wall = point[3] if len(point) > 3 else None
        batch[(name, step)] = (_finite(value), None if wall is None else float(wall))
    if not batch:
        return 0
    if _is_postgres(session):
        written = _insert_metrics_postgres(session, job_id, attempt, batch)
    else:
        stmt = sa.text(
            "INSERT INTO metrics (job_id, name, step, attempt, value, wall_time)"
            " SELECT :job_id, :name, :step, :attempt, :value, :wall_time"
            f" WHERE {_fence_sql(session)}{_METRICS_UPSERT}"
        )
        params = [
            {"job_id": job_id, "attempt": attempt, "name": n, "step": s, "value": v, "wall_time": w}
            for (n, s), (v, w) in batch.items()
        ]
        written = session.execute(stmt, params, execution_options=_ROWCOUNT).rowcount
    if written == 0:
        raise StaleAttempt(job_id, attempt)
    _refresh_blocks(session, job_id, {(name, step // METRIC_BLOCK_STEPS) for name, step in batch})
    return written


_METRICS_UPSERT = (
    " ON CONFLICT (job_id, name, step) DO UPDATE SET attempt = excluded.attempt,"
    " value = excluded.value, wall_time = excluded.wall_time"
)
_STAGING = "metrics_staging"


def _insert_metrics_postgres(
    session: Session, job_id: str, attempt: int, batch: dict[tuple[str, int], tuple[float | None, float | None]]
) -> int:
    connection = session.connection()
    raw = connection.connection.driver_connection  # inside the session's transaction
    if not isinstance(raw, psycopg.Connection):  # asyncpg (the API): one multi-row INSERT
        return _insert_metrics_unnest(session, job_id, attempt, batch)
    if not connection.info.get(_STAGING):  # once per pooled connection
        raw.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING}"
            " (name varchar, step bigint, value float8, wall_time float8) ON COMMIT DELETE ROWS"
        )
        connection.info[_STAGING] = True
    with raw.cursor() as cursor:
        with cursor.copy(f"COPY {_STAGING} (name, step, value, wall_time) FROM STDIN") as copy:
            for (name, step), (value, wall) in batch.items():
                copy.write_row((name, step, value, wall))
        # Emptying the staging table in the same statement keeps a second batch in the
        # same transaction from seeing this one's rows.
        cursor.execute(
            f"WITH batch AS (DELETE FROM {_STAGING} RETURNING name, step, value, wall_time)"
            " INSERT INTO metrics (job_id, name, step, attempt, value, wall_time)"
            " SELECT %(job_id)s::varchar, name, step, %(attempt)s::integer, value, wall_time FROM batch"
            f" WHERE {_fence_sql(session, job_id='%(job_id)s::varchar', attempt='%(attempt)s::integer')}"
            f"{_METRICS_UPSERT}",
            {"job_id": job_id, "attempt": attempt},
        )
        return cursor.rowcount


def _insert_metrics_unnest(
    session: Session, job_id: str, attempt: int, batch: dict[tuple[str, int], tuple[float | None, float | None]]
) -> int:
    stmt = sa.text(
        "INSERT INTO metrics (job_id, name, step, attempt, value, wall_time)"
        " SELECT CAST(:job_id AS VARCHAR), u.name, u.step, CAST(:attempt AS INTEGER), u.value, u.wall_time"
        " FROM unnest(CAST(:names AS VARCHAR[]), CAST(:steps AS BIGINT[]),"
        " CAST(:vals AS FLOAT8[]), CAST(:walls AS FLOAT8[])) AS u(name, step, value, wall_time)"
        f" WHERE {_fence_sql(session)}{_METRICS_UPSERT}"
    )
    params = {
        "job_id": job_id,
        "attempt": attempt,
        "names": [key[0] for key in batch],
        "steps": [key[1] for key in batch],
        "vals": [v[0] for v in batch.values()],
        "walls": [v[1] for v in batch.values()],
    }
    return session.execute(stmt, params, execution_options=_ROWCOUNT).rowcount


_BLOCK_COLUMNS = ("low_step", "low_value", "high_step", "high_value", "null_step")
_BLOCKS_UPSERT = " ON CONFLICT (job_id, name, block) DO UPDATE SET " + ", ".join(
    f"{column} = excluded.{column}" for column in _BLOCK_COLUMNS
)


def _refresh_blocks(session: Session, job_id: str, touched: set[tuple[str, int]]) -> None:
    """Recompute the metric blocks (models.MetricBlock) that a batch wrote into, from the
    points themselves: exact also when a resumed attempt overwrote a step. Runs after the
    fenced insert in the same transaction, so blocks and points commit together."""
    if _is_postgres(session):
        # One statement for the whole batch: the touched blocks as arrays, each one's points
        # read as a key range (LATERAL: an index range per block, whatever the statistics say
        # about a table that grows by the batch).
        session.execute(
            sa.text(
                "INSERT INTO metric_blocks (job_id, name, block, low_step, low_value, high_step, high_value, null_step)"
                " SELECT CAST(:job_id AS VARCHAR), t.name, t.block, low[2]::bigint, low[1], high[2]::bigint, high[1], null_step"
                " FROM unnest(CAST(:names AS VARCHAR[]), CAST(:blocks AS BIGINT[])) AS t(name, block)"
                " CROSS JOIN LATERAL (SELECT"
                " min(ARRAY[m.value, m.step::float8]) FILTER (WHERE m.value IS NOT NULL) AS low,"
                " max(ARRAY[m.value, m.step::float8]) FILTER (WHERE m.value IS NOT NULL) AS high,"
                " min(m.step) FILTER (WHERE m.value IS NULL) AS null_step"
                " FROM metrics m WHERE m.job_id = CAST(:job_id AS VARCHAR) AND m.name = t.name"
                f" AND m.step BETWEEN t.block * {METRIC_BLOCK_STEPS} AND t.block * {METRIC_BLOCK_STEPS} + {METRIC_BLOCK_STEPS - 1}"
                ") AS s"
                f"{_BLOCKS_UPSERT}"
            ),
            {"job_id": job_id, "names": [name for name, _ in touched], "blocks": [block for _, block in touched]},
        )
        return
    # SQLite (in-process, so several small statements cost little): per touched block, the
    # bare `step` column comes from the row that holds the min() or max() (documented).
    points = f"FROM metrics WHERE job_id = :job_id AND name = :name AND step BETWEEN :block * {METRIC_BLOCK_STEPS} AND :block * {METRIC_BLOCK_STEPS} + {METRIC_BLOCK_STEPS - 1}"
    session.execute(
        sa.text(
            "INSERT INTO metric_blocks (job_id, name, block, low_step, low_value, high_step, high_value, null_step)"
            " SELECT :job_id, :name, :block, low.step, low.value, high.step, high.value,"
            f" (SELECT min(step) {points} AND value IS NULL)"
            f" FROM (SELECT step, min(value) AS value {points} AND value IS NOT NULL) AS low,"
            f" (SELECT step, max(value) AS value {points} AND value IS NOT NULL) AS high"
            f" WHERE true{_BLOCKS_UPSERT}"
        ),
        [{"job_id": job_id, "name": name, "block": block} for name, block in touched],
    )


def add_checkpoint(
    session: Session,
    job_id: str,
    attempt: int,
    *,
    step: int,
    uri: str,
    bytes: int,
    sha256: str,
    now: datetime | None = None,
) -> None:
    """Record a checkpoint written by the running attempt (replacing one at the same step).
    Raises StaleAttempt if the attempt is not running."""
    values = sa.select(
        sa.literal(job_id, sa.String),
        sa.literal(step, sa.BigInteger),
        sa.literal(attempt, sa.Integer),
        sa.literal(uri, sa.Text),
        sa.literal(bytes, sa.BigInteger),
        sa.literal(sha256, sa.String),
        sa.literal(now or utcnow(), UTCDateTime),
    ).where(_fence(job_id, attempt, session))
    columns = ["job_id", "step", "attempt", "uri", "bytes", "sha256", "created_at"]
    insert = (postgresql.insert if _is_postgres(session) else sa.dialects.sqlite.insert)(Checkpoint.__table__)
    stmt = insert.from_select(columns, values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["job_id", "step"],
        set_={c: stmt.excluded[c] for c in ("attempt", "uri", "bytes", "sha256", "created_at")},
    )
    if session.execute(stmt, execution_options=_ROWCOUNT).rowcount == 0:
        raise StaleAttempt(job_id, attempt)


def list_checkpoints(session: Session, job_id: str) -> list[Checkpoint]:
    return list(
        session.execute(sa.select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)).scalars()
    )


def get_checkpoint(session: Session, job_id: str, step: int) -> Checkpoint:
    checkpoint = session.get(Checkpoint, (job_id, step))
    if checkpoint is None:
        raise NotFound("checkpoint", f"{job_id}@{step}")
    return checkpoint


def latest_checkpoint(session: Session, job_id: str) -> Checkpoint | None:
    """Where the next attempt resumes from."""
    return session.execute(
        sa.select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc()).limit(1)
    ).scalar_one_or_none()


class LogLine(NamedTuple):
    line: str
    level: str = "info"
    ts: datetime | None = None


def append_logs(
    session: Session, job_id: str, attempt: int, lines: Iterable[LogLine | str]
) -> int:
    """Append log lines of the running attempt; raises StaleAttempt if it is not running."""
    now = utcnow()
    rows = []
    for item in lines:
        entry = LogLine(item) if isinstance(item, str) else LogLine(*item)
        rows.append({"line": entry.line, "level": entry.level, "ts": entry.ts or now})
    if not rows:
        return 0
    values = sa.select(
        sa.literal(job_id, sa.String),
        sa.literal(attempt, sa.Integer),
        sa.bindparam("ts", type_=UTCDateTime),
        sa.bindparam("level", type_=sa.String),
        sa.bindparam("line", type_=sa.Text),
    ).where(_fence(job_id, attempt, session))
    stmt = sa.insert(JobLog.__table__).from_select(["job_id", "attempt", "ts", "level", "line"], values)
    written = session.execute(stmt, rows, execution_options=_ROWCOUNT).rowcount
    if written == 0:
        raise StaleAttempt(job_id, attempt)
    return written


def read_logs(session: Session, job_id: str, *, after_id: int = 0, limit: int = 1000) -> list[JobLog]:
    """Log lines in order; pass the last id seen as `after_id` to follow (`logs -f`)."""
    return list(
        session.execute(
            sa.select(JobLog).where(JobLog.job_id == job_id, JobLog.id > after_id).order_by(JobLog.id).limit(limit)
        ).scalars()
    )


# --- reading metrics ----------------------------------------------------------------------

Point = tuple[int, float | None]


def metric_names(session: Session, job_id: str) -> list[str]:
    """The job's series names, found by skipping through the key (one index probe per
    name) instead of reading every point."""
    names = sa.text(
        "WITH RECURSIVE n(name) AS ("
        " SELECT (SELECT min(name) FROM metrics WHERE job_id = :job_id)"
        " UNION ALL"
        " SELECT (SELECT min(m.name) FROM metrics m WHERE m.job_id = :job_id AND m.name > n.name)"
        " FROM n WHERE n.name IS NOT NULL)"
        " SELECT name FROM n WHERE name IS NOT NULL"
    )
    return list(session.execute(names, {"job_id": job_id}).scalars())


def last_metrics(session: Session, job_id: str) -> dict[str, Point]:
    """The latest point of every series: what GET /v1/jobs/{id} shows."""
    result: dict[str, Point] = {}
    for name in metric_names(session, job_id):
        row = session.execute(
            sa.select(Metric.step, Metric.value)
            .where(Metric.job_id == job_id, Metric.name == name)
            .order_by(Metric.step.desc())
            .limit(1)
        ).first()
        if row is not None:
            result[name] = (row.step, row.value)
    return result


def read_series(
    session: Session,
    job_id: str,
    names: Sequence[str] | None = None,
    since_step: int | None = None,
    max_points: int | None = None,
) -> dict[str, list[Point]]:
    """Each series as [(step, value)] in step order (value None for a non-finite point).

    With `max_points`, a longer series is cut into max_points // 2 buckets of equal step
    width, and each bucket contributes its minimum and its maximum point (and its first
    null point, if it has one: a divergence must stay visible), so spikes survive. The
    buckets are computed by the database (GROUP BY), not by shipping every point here;
    a bucket four or more 64-step blocks wide is made of whole blocks and read from the
    metric blocks (models.MetricBlock), so a 1,000,000-point series costs ~16,000 rows.
    """
    if names is None:
        names = metric_names(session, job_id)
    lower = since_step if since_step is not None else None
    out: dict[str, list[Point]] = {}
    for name in names:
        out[name] = _read_one(session, job_id, name, lower, max_points)
    return out


def _series_filter(job_id: str, name: str, since_step: int | None) -> list[sa.ColumnElement[bool]]:
    where = [Metric.job_id == job_id, Metric.name == name]
    if since_step is not None:
        where.append(Metric.step >= since_step)
    return where


def _read_one(session: Session, job_id: str, name: str, since_step: int | None, max_points: int | None) -> list[Point]:
    where = _series_filter(job_id, name, since_step)
    if max_points is not None:
        max_points = max(1, max_points)
        lo, hi = session.execute(sa.select(sa.func.min(Metric.step), sa.func.max(Metric.step)).where(*where)).one()
        if lo is None:
            return []
        # Steps are unique per series: a range no wider than max_points holds few enough.
        if hi - lo + 1 > max_points:
            # Two points per bucket (min, max). A bucket with non-finite values adds a third
            # (its first null); if those do not fit, use buckets of three points instead.
            for per_bucket in (2, 3):
                points = sorted(set(_downsample(session, job_id, name, lo, hi, max(1, max_points // per_bucket))))
                if len(points) <= max_points:
                    break
            return points[:max_points]
    rows = session.execute(sa.select(Metric.step, Metric.value).where(*where).order_by(Metric.step)).all()
    return [(row.step, row.value) for row in rows]


class _Source(NamedTuple):
    """Where bucket extremes are read from: the points, or the blocks that summarise them."""

    table: str
    key: str  # the column the buckets cut: step, or block
    low_step: str
    low_value: str
    high_step: str
    high_value: str
    null_step: str  # NULL where the row has no non-finite point


_POINTS = _Source("metrics", "step", "step", "value", "step", "value", "CASE WHEN value IS NULL THEN step END")
_BLOCKS = _Source("metric_blocks", "block", "low_step", "low_value", "high_step", "high_value", "null_step")

# Blocks are used when a bucket spans at least this many of them: buckets are then whole
# blocks (their width rounded up to a multiple of 64 steps), which costs at most a fifth of
# the buckets; narrower buckets read the points (at most ~4·64·max_points of them).
_MIN_BLOCKS_PER_BUCKET = 4


def _downsample(session: Session, job_id: str, name: str, lo: int, hi: int, buckets: int) -> list[Point]:
    """Each bucket's extremes over steps [lo, hi] cut into at most `buckets` buckets."""
    width = -(-(hi - lo + 1) // buckets)  # ceil
    if width < _MIN_BLOCKS_PER_BUCKET * METRIC_BLOCK_STEPS:
        return _extremes(session, _POINTS, job_id, name, lo, hi, width)
    # A head that starts inside a block is read from its points, as one more bucket.
    first = -(-lo // METRIC_BLOCK_STEPS)
    points: list[Point] = []
    if first * METRIC_BLOCK_STEPS > lo:
        points = _extremes(session, _POINTS, job_id, name, lo, first * METRIC_BLOCK_STEPS - 1, METRIC_BLOCK_STEPS)
        buckets = max(1, buckets - 1)
    last = hi // METRIC_BLOCK_STEPS
    per_bucket = -(-(last - first + 1) // buckets)
    return points + _extremes(session, _BLOCKS, job_id, name, first, last, per_bucket)


def _extremes(session: Session, src: _Source, job_id: str, name: str, lo: int, hi: int, width: int) -> list[Point]:
    """Per bucket of `width` keys in [lo, hi]: the lowest and highest finite point and the
    first non-finite one. Computed by the database (GROUP BY), not by shipping rows here."""
    params = {"job_id": job_id, "name": name, "lo": lo, "hi": hi, "width": width}
    rows_of = f"FROM {src.table} WHERE job_id = :job_id AND name = :name AND {src.key} BETWEEN :lo AND :hi"
    group = f"GROUP BY ({src.key} - :lo) / :width"
    points: list[Point] = []
    if _is_postgres(session):
        # min/max over (value, step) arrays give the extreme value and its step in one pass.
        session.execute(sa.text("SET LOCAL jit = off"))  # compiling costs more than it saves here
        rows = session.execute(
            sa.text(
                f"SELECT min(ARRAY[{src.low_value}, {src.low_step}::float8]) FILTER (WHERE {src.low_value} IS NOT NULL),"
                f" max(ARRAY[{src.high_value}, {src.high_step}::float8]) FILTER (WHERE {src.high_value} IS NOT NULL),"
                f" min({src.null_step}) {rows_of} {group}"
            ),
            params,
        ).all()
        for low, high, null_step in rows:
            if low is not None:
                points.append((int(low[1]), low[0]))
            if high is not None:
                points.append((int(high[1]), high[0]))
            if null_step is not None:
                points.append((int(null_step), None))
        return points
    # SQLite returns a bare column from the row that holds the group's min() or max()
    # (documented behaviour), which gives each extreme's step without a second pass.
    for step, aggregate, value in ((src.low_step, "min", src.low_value), (src.high_step, "max", src.high_value)):
        rows = session.execute(
            sa.text(f"SELECT {step}, {aggregate}({value}) {rows_of} AND {value} IS NOT NULL {group}"), params
        ).all()
        points.extend((int(step_), value_) for step_, value_ in rows)
    nulls = session.execute(sa.text(f"SELECT min({src.null_step}) {rows_of} {group}"), params).all()
    points.extend((int(step_), None) for (step_,) in nulls if step_ is not None)
    return points


# -- dispatch ---------------------------------------------------------------------------


def dispatchable_jobs(session: Session, *, now: datetime | None = None, limit: int = 10_000) -> list[tuple[str, int]]:
    """(id, priority) of queued jobs that may be claimed now, in dispatch order: what the
    reconciler makes sure the Redis queue holds (backing-off jobs join when they are due)."""
    now = now or utcnow()
    rows = session.execute(
        sa.select(Job.id, Job.priority)
        .where(
            Job.state == JobState.QUEUED,
            Job.cancel_requested_at.is_(None),
            sa.or_(Job.not_before.is_(None), Job.not_before <= now),
        )
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
        .limit(limit)
    ).all()
    return [(row.id, row.priority) for row in rows]


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


# --- service-wide counts (the API's /metrics) --------------------------------------------


def count_jobs_by_state(session: Session) -> dict[JobState, int]:
    """Jobs of every project per state, for the Prometheus gauge read at scrape time."""
    rows = session.execute(sa.select(Job.state, sa.func.count()).group_by(Job.state)).all()
    return {state: count for state, count in rows}


# The columns a new job is inserted with; every other column of `jobs` starts NULL.
JOB_INSERT_COLUMNS = (
    "id", "project_id", "sweep_id", "name", "tags", "config", "state", "priority", "attempt",
    "max_attempts", "retry_base", "step", "max_steps", "progress", "idempotency_key",
    "created_at", "updated_at",
)


def new_job_values(
    *,
    project_id: str,
    config: Mapping[str, Any],
    name: str | None = None,
    tags: Sequence[str] = (),
    priority: int = 0,
    max_attempts: int = 3,
    max_steps: int | None = None,
    idempotency_key: str | None = None,
    sweep_id: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The row of a new queued job, keyed by JOB_INSERT_COLUMNS (with a fresh id)."""
    now = now or utcnow()
    return {
        "id": new_id("job"),
        "project_id": project_id,
        "sweep_id": sweep_id,
        "name": name,
        "tags": list(tags),
        "config": dict(config),
        "state": JobState.QUEUED,
        "priority": priority,
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
