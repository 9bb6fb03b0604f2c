"""Metric blocks (models.MetricBlock): kept exact by every write, overwrites included, and a
downsampled read of a long series through them returns each bucket's true extremes."""

from __future__ import annotations

import math
import random

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.store.db import repo, states
from service.store.db.errors import StaleAttempt
from service.store.db.models import METRIC_BLOCK_STEPS as B

from .conftest import make_running

Series = dict[int, float | None]


def brute_blocks(values: Series) -> dict[int, tuple]:
    """(low_step, low_value, high_step, high_value, null_step) per block, from the points."""
    out: dict[int, tuple] = {}
    for block in sorted({s // B for s in values}):
        steps = [s for s in sorted(values) if s // B == block]
        finite = [(values[s], s) for s in steps if values[s] is not None]
        low = min(finite) if finite else (None, None)
        high = max(finite) if finite else (None, None)
        nulls = [s for s in steps if values[s] is None]
        out[block] = (low[1], low[0], high[1], high[0], nulls[0] if nulls else None)
    return out


def stored_blocks(session: Session, job_id: str, name: str) -> dict[int, tuple]:
    rows = session.execute(
        sa.text(
            "SELECT block, low_step, low_value, high_step, high_value, null_step FROM metric_blocks"
            " WHERE job_id = :j AND name = :n ORDER BY block"
        ),
        {"j": job_id, "n": name},
    ).all()
    return {row[0]: tuple(row[1:]) for row in rows}


def extremes(values: Series, lo: int, hi: int) -> set[tuple[int, float | None]]:
    steps = [s for s in range(lo, hi + 1) if s in values]
    finite = [(values[s], s) for s in steps if values[s] is not None]
    out = set()
    if finite:
        (lv, ls), (hv, hs) = min(finite), max(finite)
        out |= {(ls, lv), (hs, hv)}
    nulls = [s for s in steps if values[s] is None]
    if nulls:
        out.add((nulls[0], None))
    return out


def reference(values: Series, since: int, max_points: int) -> list[tuple[int, float | None]]:
    """The documented layout: two points per bucket, or three when non-finite points need
    room; buckets of equal step width, made of whole blocks once a bucket spans four or
    more (a head that starts inside a block is then one more bucket)."""
    lo, hi = min(s for s in values if s >= since), max(values)
    for per in (2, 3):
        buckets = max_points // per
        width = -(-(hi - lo + 1) // buckets)
        if width < 4 * B:
            segments = [(a, min(a + width - 1, hi)) for a in range(lo, hi + 1, width)]
        else:
            first, segments = -(-lo // B), []
            if first * B > lo:
                segments.append((lo, first * B - 1))
                buckets -= 1
            last = hi // B
            m = -(-(last - first + 1) // buckets)
            segments += [(k * B, min((k + m) * B - 1, hi)) for k in range(first, last + 1, m)]
        points = sorted(set().union(*(extremes(values, a, b) for a, b in segments)))
        if len(points) <= max_points:
            break
    return points[:max_points]


def test_blocks_follow_every_write_including_overwrites(session: Session) -> None:
    job, attempt = make_running(session)
    rng = random.Random(1)
    values: Series = {}
    first = [(s, rng.random() if rng.random() > 0.02 else math.nan) for s in range(0, 3000)]
    for start in range(0, 3000, 250):  # batches as a worker flushes them
        repo.insert_metrics(session, job.id, attempt, [("loss", s, v) for s, v in first[start : start + 250]])
    values.update({s: (None if math.isnan(v) else v) for s, v in first})
    session.commit()
    assert stored_blocks(session, job.id, "loss") == brute_blocks(values)

    # A resumed attempt recomputes steps 1000..1999: finite becomes nan and back, extremes move.
    states.requeue_lost(session, job.id, attempt, require_expired=False)
    second = states.claim(session, job.id, "w2", 30)
    redo = {s: (math.nan if s % 97 == 0 else -rng.random()) for s in range(1000, 2000)}
    redo[1500] = 50.0
    repo.insert_metrics(session, job.id, second, [("loss", s, v) for s, v in redo.items()])
    values.update({s: (None if math.isnan(v) else v) for s, v in redo.items()})
    session.commit()
    assert stored_blocks(session, job.id, "loss") == brute_blocks(values)


def test_a_stale_write_leaves_the_blocks_alone(session: Session) -> None:
    job, attempt = make_running(session)
    repo.insert_metrics(session, job.id, attempt, [("loss", s, float(s)) for s in range(100)])
    session.commit()
    before = stored_blocks(session, job.id, "loss")
    states.requeue_lost(session, job.id, attempt, require_expired=False)
    session.commit()
    try:
        repo.insert_metrics(session, job.id, attempt, [("loss", 5, -1.0)])
    except StaleAttempt:
        session.rollback()
    assert stored_blocks(session, job.id, "loss") == before


def test_long_series_reads_through_blocks_exactly(session: Session) -> None:
    job, attempt = make_running(session)
    rng = random.Random(2)
    values: Series = {}
    for start in range(1, 60_001, 10_000):
        batch = [(s, rng.gauss(0, 1) if rng.random() > 0.001 else math.nan) for s in range(start, start + 10_000)]
        repo.insert_metrics(session, job.id, attempt, [("loss", s, v) for s, v in batch])
        values.update({s: (None if math.isnan(v) else v) for s, v in batch})
    values_spike = {31_337: 1e6, 45_001: -1e6}
    repo.insert_metrics(session, job.id, attempt, [("loss", s, v) for s, v in values_spike.items()])
    values.update(values_spike)
    session.commit()
    # Through blocks (a bucket of 4+ blocks), aligned or not, and through the points.
    for since, max_points in ((1, 100), (0, 150), (12_345, 64), (64 * 300, 200), (0, 1000), (59_000 - 7, 12)):
        got = repo.read_series(session, job.id, names=["loss"], since_step=since, max_points=max_points)["loss"]
        assert got == reference(values, since, max_points), (since, max_points)
        assert len(got) <= max_points
    whole = repo.read_series(session, job.id, names=["loss"], max_points=1000)["loss"]
    assert (31_337, 1e6) in whole and (45_001, -1e6) in whole


def test_negative_steps_are_refused(session: Session) -> None:
    job, attempt = make_running(session)
    try:
        repo.insert_metrics(session, job.id, attempt, [("loss", -1, 1.0)])
    except ValueError as err:
        assert "step must be >= 0" in str(err)
    else:
        raise AssertionError("a negative step was accepted")
