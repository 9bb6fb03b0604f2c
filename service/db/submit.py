"""The submission insert of the API, its hottest statement, from async code.

On asyncpg (PostgreSQL) it runs on the pooled driver connection itself: one prepared
``INSERT … ON CONFLICT DO NOTHING RETURNING id``, committed by itself (no BEGIN/COMMIT).
Through an AsyncSession the same statement cost about 470 µs of CPU per job (session,
autobegin, execution context, result rows) against about 210 µs here, and the API is
CPU-bound on submissions (bench/api.py). The columns and values are repo's
(JOB_INSERT_COLUMNS, new_job_values), so this path and repo.insert_job cannot drift;
other drivers (aiosqlite) run repo.insert_job through a session.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from service.db import repo
from service.db.errors import DatabaseUnavailable
from service.db.models import JobState
from service.db.session import is_unavailable

_SQL = (
    f"INSERT INTO jobs ({', '.join(repo.JOB_INSERT_COLUMNS)})"
    f" VALUES ({', '.join(f'${i}' for i in range(1, len(repo.JOB_INSERT_COLUMNS) + 1))})"
    " ON CONFLICT (project_id, idempotency_key) DO NOTHING RETURNING id"
)
# Columns stored as JSON text (the engine's jsonb codec takes the serialized document).
_JSON = frozenset({"tags", "config"})


def _parameters(values: Mapping[str, Any]) -> list[Any]:
    out = []
    for column in repo.JOB_INSERT_COLUMNS:
        value = values[column]
        if column in _JSON:
            value = json.dumps(value)
        elif isinstance(value, JobState):
            value = value.value
        out.append(value)
    return out


async def _with_session(engine: AsyncEngine, fn: Any, *args: Any) -> Any:
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        async with AsyncSession(bind=conn, expire_on_commit=False) as session:
            return await session.run_sync(fn, *args)


async def insert_job(engine: AsyncEngine, values: Mapping[str, Any]) -> tuple[Any, bool]:
    """Insert the job `values` (repo.new_job_values); a used Idempotency-Key returns the
    job that holds it. Returns (job, created); raises DatabaseUnavailable like a session."""
    if engine.dialect.driver != "asyncpg":
        return await _with_session(engine, repo.insert_job, values)
    raw = await engine.raw_connection()  # connect failures are DatabaseUnavailable already
    try:
        inserted = await raw.driver_connection.fetchval(_SQL, *_parameters(values))
    except Exception as exc:
        if is_unavailable(exc):
            raw.invalidate(exc)  # never hand a broken connection to the next request
            raise DatabaseUnavailable(f"database unavailable: {exc}".strip()) from exc
        raise
    finally:
        raw.close()  # back to the pool
    if inserted is not None:
        return repo.new_job_row(values), True
    job = await _with_session(engine, repo.existing_job_for_key, values["project_id"], values["idempotency_key"])
    return job, False
