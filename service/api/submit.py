"""The submission insert of the API, its hottest statement, from async code.

On asyncpg (PostgreSQL) the inserts are group-committed (`JobInserts`, service.api.batching):
the rows of the requests that arrive while a statement is in flight go out together in the
next one, a multi-row INSERT … SELECT FROM unnest(…) … ON CONFLICT DO NOTHING RETURNING id
on a pooled driver connection, committed by itself (no BEGIN/COMMIT). Nothing waits on a
timer: a lone request is written at once. Through an AsyncSession one such INSERT cost
about 470 µs of CPU per job (session, autobegin, execution context, result rows) against
about 210 µs on the driver connection, and the API is CPU-bound on submissions
(bench/api.py). The columns and values are repo's (JOB_INSERT_COLUMNS, new_job_values), so
this path and repo.insert_job cannot drift; other drivers (aiosqlite) run repo.insert_job
through a session.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic_core import to_json
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.batching import Batcher
from service.store.db import repo
from service.store.db.errors import DatabaseUnavailable
from service.store.db.models import Job, JobState
from service.store.db.session import is_unavailable, run_autocommit

# Columns stored as JSON text (the engine's jsonb codec takes the serialized document).
_JSON = frozenset({"tags", "config"})


def _parameters(values: Mapping[str, Any]) -> list[Any]:
    out = []
    for column in repo.JOB_INSERT_COLUMNS:
        value = values[column]
        if column in _JSON:  # pydantic's serializer: a quarter of json.dumps's time here
            value = to_json(value).decode()
        elif isinstance(value, JobState):
            value = value.value
        out.append(value)
    return out


def _array_casts() -> list[str]:
    from sqlalchemy.dialects import postgresql

    dialect = postgresql.dialect()
    casts = []
    for column in repo.JOB_INSERT_COLUMNS:
        kind = Job.__table__.c[column].type
        kind = getattr(kind, "impl_instance", None) or kind
        casts.append(f"${len(casts) + 1}::{kind.dialect_impl(dialect).compile(dialect=dialect)}[]")
    return casts


_MANY_SQL = (
    f"INSERT INTO jobs ({', '.join(repo.JOB_INSERT_COLUMNS)})"
    f" SELECT * FROM unnest({', '.join(_array_casts())})"
    " ON CONFLICT (project_id, idempotency_key) DO NOTHING RETURNING id"
)


class JobInserts:
    """Submissions' INSERTs, group-committed on asyncpg (service.api.batching): the rows of
    concurrent requests go out as one statement. A row that hit a used Idempotency-Key
    (also one used earlier in the same batch) comes back as not created."""

    def __init__(self, engine: AsyncEngine, *, max_batch: int = 256, parallel: int = 2) -> None:
        self.engine = engine
        self._batcher: Batcher[Mapping[str, Any], bool] = Batcher(
            lambda rows: _insert_many(engine, rows),
            max_batch=max_batch,
            parallel=parallel,
            shared=lambda exc: isinstance(exc, DatabaseUnavailable),
        )

    async def insert(self, values: Mapping[str, Any]) -> tuple[Any, bool]:
        """Insert the job `values` (repo.new_job_values); a used Idempotency-Key returns the
        job that holds it. Returns (job, created); raises DatabaseUnavailable like a session."""
        if self.engine.dialect.driver != "asyncpg":
            return await run_autocommit(self.engine, repo.insert_job, values)
        if await self._batcher.submit(values):
            return repo.new_job_row(values), True
        job = await run_autocommit(self.engine, repo.existing_job_for_key, values["project_id"], values["idempotency_key"])
        return job, False


async def _insert_many(engine: AsyncEngine, rows: Sequence[Mapping[str, Any]]) -> list[bool]:
    """One INSERT of `rows`; for each, whether it was inserted (or hit a used key)."""
    columns = [_parameters(values) for values in rows]
    arrays = [list(column) for column in zip(*columns)]
    raw = await engine.raw_connection()  # connect failures are DatabaseUnavailable already
    try:
        records = await raw.driver_connection.fetch(_MANY_SQL, *arrays)
    except Exception as exc:
        if is_unavailable(exc):
            raw.invalidate(exc)  # never hand a broken connection to the next request
            raise DatabaseUnavailable(f"database unavailable: {exc}".strip()) from exc
        raise
    finally:
        raw.close()  # back to the pool
    inserted = {record[0] for record in records}
    return [values["id"] in inserted for values in rows]
