"""Metric points and their per-block extremes: the batched, fenced insert, and reads
(whole series or downsampled keeping extremes)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.store.db.errors import StaleAttempt
from service.store.db.models import (
    METRIC_BLOCK_STEPS,
    Metric,
)
from service.store.db.repo.common import is_postgres
from service.store.db.repo.fencing import ROWCOUNT, fence_sql


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
    if is_postgres(session):
        written = _insert_metrics_postgres(session, job_id, attempt, batch)
    else:
        stmt = sa.text(
            "INSERT INTO metrics (job_id, name, step, attempt, value, wall_time)"
            " SELECT :job_id, :name, :step, :attempt, :value, :wall_time"
            f" WHERE {fence_sql(session)}{_METRICS_UPSERT}"
        )
        params = [
            {"job_id": job_id, "attempt": attempt, "name": n, "step": s, "value": v, "wall_time": w}
            for (n, s), (v, w) in batch.items()
        ]
        written = session.execute(stmt, params, execution_options=ROWCOUNT).rowcount
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
            f" WHERE {fence_sql(session, job_id='%(job_id)s::varchar', attempt='%(attempt)s::integer')}"
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
        f" WHERE {fence_sql(session)}{_METRICS_UPSERT}"
    )
    params = {
        "job_id": job_id,
        "attempt": attempt,
        "names": [key[0] for key in batch],
        "steps": [key[1] for key in batch],
        "vals": [v[0] for v in batch.values()],
        "walls": [v[1] for v in batch.values()],
    }
    return session.execute(stmt, params, execution_options=ROWCOUNT).rowcount


_BLOCK_COLUMNS = ("low_step", "low_value", "high_step", "high_value", "null_step")
_BLOCKS_UPSERT = " ON CONFLICT (job_id, name, block) DO UPDATE SET " + ", ".join(
    f"{column} = excluded.{column}" for column in _BLOCK_COLUMNS
)


def _refresh_blocks(session: Session, job_id: str, touched: set[tuple[str, int]]) -> None:
    """Recompute the metric blocks (models.MetricBlock) that a batch wrote into, from the
    points themselves: exact also when a resumed attempt overwrote a step. Runs after the
    fenced insert in the same transaction, so blocks and points commit together."""
    if is_postgres(session):
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
    if is_postgres(session):
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


