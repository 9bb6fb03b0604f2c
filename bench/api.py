"""Submission throughput and latency of `unroll api` on PostgreSQL, next to a bare FastAPI
endpoint that does one INSERT on the same database, in the same run (issue 4, "Done when").

    python bench/api.py [--seconds 8] [--repeats 2] [--clients 64] [--rate 500]

Both servers run as subprocesses under uvicorn with uvloop and httptools, one process
each; the load generator is this process (a minimal keep-alive HTTP/1.1 client on asyncio
streams, so it costs little CPU next to the servers on the same machine):

- closed loop: `--clients` connections each send POST back to back for `--seconds`:
  accepted (201) requests per second.
- open loop: requests start on a fixed schedule of `--rate` per second; latency is counted
  from the scheduled start (so a server that falls behind pays for its queue), p50/p99.

Prints a table and writes bench/results/api.json (medians over `--repeats` runs, plus every
run). Needs PostgreSQL (UNROLL_TEST_POSTGRES_URL, default postgres@127.0.0.1:5432) and
Redis (UNROLL_REDIS_URL, default 127.0.0.1:6379).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import create_postgres_database, drop_postgres_database, free_port  # noqa: E402

REDIS_URL = os.environ.get("UNROLL_REDIS_URL", "redis://127.0.0.1:6379/0")

JOB = {
    "name": "bench",
    "model": {"cell": "lstm", "hidden_size": 32},
    "data": {"kind": "recall", "vocab": 4, "lag": 8, "length": 1000},
    "tbptt": {"k1": 16},
    "train": {"max_steps": 100},
}

# The bare endpoint: what FastAPI + asyncpg costs for one INSERT of the same document.
BARE_APP = '''
import json, os, secrets
import asyncpg
from fastapi import FastAPI, Request
from contextlib import asynccontextmanager

@asynccontextmanager
async def lifespan(app):
    app.state.pool = await asyncpg.create_pool(os.environ["BARE_DSN"], min_size=5, max_size=15)
    async with app.state.pool.acquire() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS bare_jobs (id text PRIMARY KEY, config jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")
    yield
    await app.state.pool.close()

app = FastAPI(lifespan=lifespan)

@app.post("/v1/jobs", status_code=201)
async def submit(request: Request):
    config = await request.json()
    job_id = "job_" + secrets.token_hex(8)
    async with request.app.state.pool.acquire() as conn:
        await conn.execute("INSERT INTO bare_jobs (id, config) VALUES ($1, $2::jsonb)", job_id, json.dumps(config))
    return {"id": job_id, "state": "queued"}
'''




# Latencies by the performance counter: uvloop's loop.time() moves in whole milliseconds.
clock = time.perf_counter


# --- a minimal HTTP/1.1 keep-alive client ------------------------------------------------------


class Connection:
    def __init__(self, port: int, request: bytes) -> None:
        self.port = port
        self.request = request
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def post(self) -> int:
        """One request; returns the status."""
        assert self.writer is not None and self.reader is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def build_request(token: str | None) -> bytes:
    body = json.dumps(JOB).encode()
    headers = [
        b"POST /v1/jobs HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Content-Type: application/json",
        b"Content-Length: " + str(len(body)).encode(),
    ]
    if token:
        headers.append(b"Authorization: Bearer " + token.encode())
    return b"\r\n".join(headers) + b"\r\n\r\n" + body


async def closed_loop(port: int, request: bytes, clients: int, seconds: float) -> dict:
    connections = [Connection(port, request) for _ in range(clients)]
    await asyncio.gather(*(c.open() for c in connections))
    # warm up: a few requests per connection, not counted
    await asyncio.gather(*(c.post() for c in connections))
    ok = errors = 0
    latencies: list[float] = []
    stop_at = clock() + seconds

    async def client(conn: Connection) -> None:
        nonlocal ok, errors
        while clock() < stop_at:
            start = clock()
            status = await conn.post()
            latencies.append(clock() - start)
            if status == 201:
                ok += 1
            else:
                errors += 1

    started = clock()
    await asyncio.gather(*(client(c) for c in connections))
    elapsed = clock() - started
    for c in connections:
        c.close()
    latencies.sort()
    return {
        "accepted_per_s": ok / elapsed,
        "accepted": ok,
        "errors": errors,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "seconds": elapsed,
    }


async def open_loop(port: int, request: bytes, rate: float, seconds: float, pool: int = 64) -> dict:
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    connections = [Connection(port, request) for _ in range(pool)]
    await asyncio.gather(*(c.open() for c in connections))
    await asyncio.gather(*(c.post() for c in connections))  # warm up
    for c in connections:
        idle.put_nowait(c)
    total = int(rate * seconds)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    extra: list[Connection] = []

    async def one(scheduled: float) -> None:
        try:
            conn = idle.get_nowait()
        except asyncio.QueueEmpty:  # all busy: a new connection, as a real client would
            conn = Connection(port, request)
            await conn.open()
            extra.append(conn)
        status = await conn.post()
        latencies.append(clock() - scheduled)
        statuses[status] = statuses.get(status, 0) + 1
        idle.put_nowait(conn)

    start = clock() + 0.05
    tasks = []
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    for c in connections + extra:
        c.close()
    latencies.sort()
    achieved = total / (clock() - start)
    return {
        "rate": rate,
        "requests": total,
        "achieved_per_s": achieved,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "max_ms": 1000 * latencies[-1],
    }


# --- servers ----------------------------------------------------------------------------------


def wait_ready(port: int, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on {port} exited:\n{log.read_text()[-3000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"server on {port} did not start:\n{log.read_text()[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "api.json")
    args = parser.parse_args()

    import sqlalchemy as sa

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    db_url = create_postgres_database("unroll_bench_api")
    prefix = f"unroll-bench-{secrets.token_hex(4)}"
    workdir = Path(tempfile.mkdtemp(prefix="unroll-bench-api-"))
    processes: list[subprocess.Popen] = []
    try:
        from service.store.db.migrate import upgrade
        from service.store.db import repo
        from service.store.db.session import make_engine
        from sqlalchemy.orm import Session

        upgrade(db_url)
        engine = make_engine(db_url)
        with Session(engine) as session:
            project = repo.get_or_create_project(session, "bench")
            token, _ = repo.create_token(session, project.id)
            session.commit()
        engine.dispose()

        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "UNROLL_DATABASE_URL": db_url,
            "UNROLL_REDIS_URL": REDIS_URL,
            "UNROLL_REDIS_PREFIX": prefix,
            "UNROLL_ARTIFACTS": str(workdir / "artifacts"),
            "UNROLL_MAX_QUEUED_PER_PROJECT": str(10**9),
            # One project is the whole load here: its concurrency is what is measured.
            "UNROLL_MAX_REQUESTS_PER_PROJECT": "0",
            "UNROLL_DB_POOL_SIZE": "15",
            "UNROLL_DB_MAX_OVERFLOW": "0",
            "BARE_DSN": sa.make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False),
        }
        api_port, bare_port = free_port(), free_port()
        (workdir / "bare_app.py").write_text(BARE_APP)
        api_log, bare_log = workdir / "api.log", workdir / "bare.log"
        api = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "api", "--port", str(api_port), "--log-level", "warning"],
            env=env, cwd=workdir, stdout=api_log.open("w"), stderr=subprocess.STDOUT,
        )
        processes.append(api)
        bare = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(bare_port), "--loop", "uvloop",
             "--http", "httptools", "--no-access-log", "--log-level", "warning"],
            env=env, cwd=workdir, stdout=bare_log.open("w"), stderr=subprocess.STDOUT,
        )
        processes.append(bare)
        wait_ready(api_port, api, api_log)
        wait_ready(bare_port, bare, bare_log)

        targets = {"unroll": (api_port, build_request(token)), "bare": (bare_port, build_request(None))}
        load_before = os.getloadavg()
        runs: list[dict] = []
        for repeat in range(args.repeats):
            for target, (port, request) in targets.items():
                closed = asyncio.run(closed_loop(port, request, args.clients, args.seconds))
                runs.append({"repeat": repeat, "target": target, "mode": "closed", **closed})
                print(f"  {target:7s} closed  {closed['accepted_per_s']:8.0f}/s  p50 {closed['p50_ms']:.1f} ms  p99 {closed['p99_ms']:.1f} ms  errors {closed['errors']}", flush=True)
            for target, (port, request) in targets.items():
                opened = asyncio.run(open_loop(port, request, args.rate, args.seconds))
                runs.append({"repeat": repeat, "target": target, "mode": "open", **opened})
                print(f"  {target:7s} open    {opened['achieved_per_s']:8.0f}/s  p50 {opened['p50_ms']:.1f} ms  p99 {opened['p99_ms']:.1f} ms  statuses {opened['statuses']}", flush=True)
        load_after = os.getloadavg()
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        try:
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
        except Exception:
            pass
        drop_postgres_database(db_url)

    def median(target: str, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["target"] == target and r["mode"] == mode)

    summary = {
        "unroll_closed_accepted_per_s": median("unroll", "closed", "accepted_per_s"),
        "bare_closed_accepted_per_s": median("bare", "closed", "accepted_per_s"),
        "unroll_open_p50_ms": median("unroll", "open", "p50_ms"),
        "unroll_open_p99_ms": median("unroll", "open", "p99_ms"),
        "bare_open_p50_ms": median("bare", "open", "p50_ms"),
        "bare_open_p99_ms": median("bare", "open", "p99_ms"),
    }
    summary["closed_ratio_vs_bare"] = summary["unroll_closed_accepted_per_s"] / summary["bare_closed_accepted_per_s"]
    targets_met = {
        "closed >= 1000/s": summary["unroll_closed_accepted_per_s"] >= 1000,
        "closed >= 0.5x bare": summary["closed_ratio_vs_bare"] >= 0.5,
        f"open p99 < 50 ms at {args.rate:.0f}/s": summary["unroll_open_p99_ms"] < 50,
    }
    print()
    print(f"{'':28s}{'unroll':>12s}{'bare':>12s}")
    print(f"{'closed loop, accepted/s':28s}{summary['unroll_closed_accepted_per_s']:12.0f}{summary['bare_closed_accepted_per_s']:12.0f}")
    print(f"{'open loop p50 (ms)':28s}{summary['unroll_open_p50_ms']:12.1f}{summary['bare_open_p50_ms']:12.1f}")
    print(f"{'open loop p99 (ms)':28s}{summary['unroll_open_p99_ms']:12.1f}{summary['bare_open_p99_ms']:12.1f}")
    print(f"ratio unroll/bare (closed): {summary['closed_ratio_vs_bare']:.2f}")
    for name_, met in targets_met.items():
        print(f"  {'PASS' if met else 'MISS'}  {name_}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} cores")
    result = {
        "summary": summary,
        "targets_met": targets_met,
        "runs": runs,
        "settings": vars(args) | {"out": str(args.out)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_before": load_before, "loadavg_after": load_after},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
