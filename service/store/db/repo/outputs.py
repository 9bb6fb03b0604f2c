"""What an attempt leaves besides metrics: checkpoints (records of stored files, the oldest
pruned past train.keep_checkpoints) and log lines, both fenced."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from service.store.db.base import UTCDateTime, utcnow
from service.store.db.errors import NotFound, StaleAttempt
from service.store.db.models import (
    Checkpoint,
    JobLog,
)
from service.store.db.repo.common import is_postgres
from service.store.db.repo.fencing import ROWCOUNT, fence


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
    ).where(fence(job_id, attempt, session))
    columns = ["job_id", "step", "attempt", "uri", "bytes", "sha256", "created_at"]
    insert = (postgresql.insert if is_postgres(session) else sa.dialects.sqlite.insert)(Checkpoint.__table__)
    stmt = insert.from_select(columns, values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["job_id", "step"],
        set_={c: stmt.excluded[c] for c in ("attempt", "uri", "bytes", "sha256", "created_at")},
    )
    if session.execute(stmt, execution_options=ROWCOUNT).rowcount == 0:
        raise StaleAttempt(job_id, attempt)


def prune_checkpoints(session: Session, job_id: str, keep: int) -> list[str]:
    """Delete the job's checkpoint records older than its newest `keep`
    (train.keep_checkpoints); returns their files' URIs, for the caller to remove after the
    commit. The newest, which a resumed attempt starts from, is always kept. Call it in the
    transaction whose add_checkpoint (fenced) recorded the new one: a stale attempt never
    gets this far."""
    old = session.execute(
        sa.select(Checkpoint.step, Checkpoint.uri)
        .where(Checkpoint.job_id == job_id)
        .order_by(Checkpoint.step.desc())
        .offset(max(1, keep))
    ).all()
    if not old:
        return []
    session.execute(
        sa.delete(Checkpoint)
        .where(Checkpoint.job_id == job_id, Checkpoint.step.in_([row.step for row in old]))
        .execution_options(synchronize_session=False)
    )
    return [row.uri for row in old]


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
    ).where(fence(job_id, attempt, session))
    stmt = sa.insert(JobLog.__table__).from_select(["job_id", "attempt", "ts", "level", "line"], values)
    written = session.execute(stmt, rows, execution_options=ROWCOUNT).rowcount
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


