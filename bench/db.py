"""Benchmark of the metrics path (not a test): PostgreSQL and SQLite side by side.

    .venv/bin/python bench/db.py [--points 1000000] [--batches 200] [--runs 7]

- insert: metric points per second written by `repo.insert_metrics` in batches of 1,000
  (each batch its own transaction, as a worker's background flush does);
- read: time of `repo.read_series(max_points=1000)` over one 1,000,000-point series
  (median of several runs), plus a whole-series read for scale.

Uses a throwaway PostgreSQL database (UNROLL_BENCH_POSTGRES_URL, default the local
server's `postgres` database for admin) and a temporary SQLite file. Prints a table and
writes bench/results/db.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import create_postgres_database, drop_postgres_database  # noqa: E402

from service.store.db import repo, states  # noqa: E402
from service.store.db.migrate import upgrade  # noqa: E402
from service.store.db.session import make_engine  # noqa: E402

ADMIN_URL = os.environ.get("UNROLL_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BATCH = 1_000


def running_job(engine: sa.Engine) -> tuple[str, int]:
    with Session(engine) as s, s.begin():
        project = repo.get_or_create_project(s, "bench")
        job, _ = repo.create_job(s, project_id=project.id, config={}, max_steps=10**7)
        s.flush()
        job_id = job.id
        attempt = states.claim(s, job_id, "bench", 3600)
    return job_id, attempt


def bench_insert(engine: sa.Engine, batches: int) -> dict[str, float]:
    job_id, attempt = running_job(engine)
    names = ["train/loss", "train/grad_norm", "train/lr", "train/clipped"]
    started = time.perf_counter()
    for b in range(batches):
        base = b * (BATCH // len(names))
        points = [(n, base + i, math.sin(base + i) + k, time.time()) for i in range(BATCH // len(names)) for k, n in enumerate(names)]
        with Session(engine) as s, s.begin():
            repo.insert_metrics(s, job_id, attempt, points)
    elapsed = time.perf_counter() - started
    return {"points": batches * BATCH, "seconds": elapsed, "points_per_s": batches * BATCH / elapsed}


def load_series(engine: sa.Engine, points: int) -> tuple[str, int]:
    job_id, attempt = running_job(engine)
    chunk = 10_000
    for start in range(1, points + 1, chunk):
        batch = [("train/loss", s, math.sin(s / 1000) + (s % 7) * 0.01) for s in range(start, min(start + chunk, points + 1))]
        with Session(engine) as s, s.begin():
            repo.insert_metrics(s, job_id, attempt, batch)
    if engine.dialect.name == "postgresql":
        # What autovacuum does soon after a load: sets the visibility map (index-only scans).
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE metrics")
    else:
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    return job_id, attempt


def bench_read(engine: sa.Engine, job_id: str, runs: int) -> dict[str, float]:
    def timed(**kw: int) -> tuple[float, int]:
        with Session(engine) as s, s.begin():
            started = time.perf_counter()
            series = repo.read_series(s, job_id, names=["train/loss"], **kw)["train/loss"]
            return time.perf_counter() - started, len(series)

    timed(max_points=1000)  # warm the cache: we measure the query, not the disk
    samples = [timed(max_points=1000) for _ in range(runs)]
    full = [timed() for _ in range(3)]
    return {
        "downsampled_ms_median": statistics.median(t for t, _ in samples) * 1000,
        "downsampled_ms_min": min(t for t, _ in samples) * 1000,
        "downsampled_points": samples[0][1],
        "full_read_ms_median": statistics.median(t for t, _ in full) * 1000,
        "full_read_points": full[0][1],
    }


def run_backend(name: str, url: str, args: argparse.Namespace) -> dict[str, object]:
    upgrade(url)
    engine = make_engine(url)
    try:
        insert = bench_insert(engine, args.batches)
        job_id, _ = load_series(engine, args.points)
        read = bench_read(engine, job_id, args.runs)
    finally:
        engine.dispose()
    return {"backend": name, "insert": insert, "read": read}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "db.json")
    args = parser.parse_args()

    results = []
    import psycopg

    try:
        url = create_postgres_database("unroll_bench", ADMIN_URL)
    except psycopg.Error as exc:
        print(f"PostgreSQL unavailable ({exc}); SQLite only", file=sys.stderr)
    else:
        try:
            results.append(run_backend("postgresql", url, args))
        finally:
            drop_postgres_database(url, ADMIN_URL)
    with tempfile.TemporaryDirectory() as tmp:
        results.append(run_backend("sqlite", f"sqlite:///{tmp}/bench.db", args))

    print(f"\nmetrics: {args.batches} batches of {BATCH} points; read: {args.points:,}-point series, median of {args.runs}")
    print(f"{'backend':<12}{'insert points/s':>18}{'downsample→1000 ms':>22}{'full read ms':>15}")
    for r in results:
        print(
            f"{r['backend']:<12}{r['insert']['points_per_s']:>18,.0f}"
            f"{r['read']['downsampled_ms_median']:>22.1f}{r['read']['full_read_ms_median']:>15.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "params": {"points": args.points, "batches": args.batches, "batch": BATCH, "runs": args.runs},
        "results": results,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
