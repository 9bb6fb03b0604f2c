"""The fence of every write made on an attempt's behalf: the write happens only if the
job still runs that attempt, checked in the same statement (no window between check and write)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.store.db.rules import runs_attempt


def fence_sql(session: Session, job_id: str = "CAST(:job_id AS VARCHAR)", attempt: str = "CAST(:attempt AS INTEGER)") -> str:
    """`fence` as SQL text, for the statements written as text (the bulk metric insert).
    `job_id` and `attempt` are the placeholders of the statement's driver. Compiled from the
    same rule (rules.runs_attempt), once per dialect and placeholders."""
    dialect = session.get_bind().dialect
    key = (dialect.name, job_id, attempt)
    sql = _FENCE_SQL.get(key)
    if sql is None:
        # Compiled with neutral markers, then given the caller's placeholders: a dialect
        # would escape the `%` of a pyformat placeholder inside a literal column.
        check = _locked(sa.select(1).where(runs_attempt(sa.literal_column("__JOB__"), sa.literal_column("__ATTEMPT__"))), dialect.name)
        text = str(check.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        sql = _FENCE_SQL[key] = f"EXISTS ({text})".replace("__JOB__", job_id).replace("__ATTEMPT__", attempt)
    return sql


_FENCE_SQL: dict[tuple[str, str, str], str] = {}


def _locked(check: sa.Select, dialect: str) -> sa.Select:
    # FOR SHARE (PostgreSQL) holds the job row until our transaction ends, so a concurrent
    # requeue/finish waits for this write instead of slipping in between check and commit.
    # SQLite needs nothing: the writer holds the database lock for the whole statement.
    return check.with_for_update(read=True) if dialect == "postgresql" else check


def fence(job_id: str, attempt: int, session: Session) -> sa.Exists:
    """The job still runs `attempt`: the condition of every write made on its behalf."""
    return sa.exists(_locked(sa.select(1).where(runs_attempt(job_id, attempt)), session.get_bind().dialect.name))


# SQLAlchemy reports rowcount reliably for INSERT only when asked to keep it.
ROWCOUNT = {"preserve_rowcount": True}

