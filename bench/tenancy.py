"""Tenancy benchmark (not a test): does what one project does move another project's
latency? (issue 14: while project A floods the queue and the event-stream endpoint at full
speed, project B's job goes from submit to running in under 1 s p50 and B's API p99 stays
under 50 ms; while a hostile sweep is sent again and again, /healthz keeps answering fast.)

    .venv/bin/python bench/tenancy.py [--seconds 20] [--b-jobs 30]

Starts its own Ray head (2 CPUs), a throwaway PostgreSQL database, `unroll api` (one
process) and `unroll worker`, and stops them all. Project A's quota is max_running 1, and
the per-project queued bound is lifted (UNROLL_MAX_QUEUED_PER_PROJECT) so that every one of
A's submissions is written and enqueued: the worst case for B. Then four phases, one after
the other in the same run, against the same services:

- quiet: B alone.
- sweep: A POSTs a hostile sweep back to back on --sweep-connections connections: a grid
  of 4 axes x 1,000 values (10^12 points), refused by its size (422) before anything is
  expanded.
- flood: A POSTs long jobs back to back on --a-connections connections (its first job
  runs on one of the two CPUs, the rest queue behind A's quota), and --a-streams tasks open
  GET /v1/jobs/{id}/events on A's jobs as fast as they can, each holding a stream it gets
  for --hold seconds; past UNROLL_MAX_STREAMS_PER_PROJECT the API answers 429 (counted,
  expected).
- after: A has stopped; its backlog stays queued and its job still runs.

In every phase B submits --b-jobs tiny jobs (1 CPU, 5 updates), one at a time, spread over
--seconds: each is watched with GET /v1/jobs/{id} until it is running (submit -> running,
from the start of the POST) and then until it ends, and every request of B is timed
(B API). A prober GETs /healthz every 20 ms. A's load comes from another process, so the
measuring process is not slowed by its own attacker; all of it shares the machine's cores
with the services it measures. Prints a table and writes bench/results/tenancy.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import (
    create_postgres_database,
    drop_postgres_database,
    free_port,
    listening,
    ray_head,
)

REDIS_URL = os.environ.get("UNROLL_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_TOKEN = "bench-admin-" + secrets.token_hex(8)

# B's job: tiny, one CPU (Ray keeps one warm worker process per CPU; a fraction would start
# processes that Ray kills again when idle, bench/dispatch.py).
B_JOB = {
    "name": "b-tiny",
    "model": {"hidden_size": 8},
    "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 200, "batch_size": 2, "valid_length": 16},
    "tbptt": {"k1": 4},
    "train": {"max_steps": 5, "eval_every": 0, "checkpoint_every": 0, "device": "cpu"},
    "resources": {"cpus": 1},
}
# A's job: small but long; the first one dispatched keeps one CPU busy for the rest of the
# run (bounded by max_wall_s), the others wait behind A's quota.
A_JOB = {
    "name": "a-flood",
    "model": {"hidden_size": 8},
    "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 10_000, "batch_size": 2, "valid_length": 16},
    "tbptt": {"k1": 4},
    "train": {"max_steps": 10_000_000, "eval_every": 0, "checkpoint_every": 0, "device": "cpu", "max_wall_s": 900},
    "resources": {"cpus": 1},
}
# 4 axes x 1,000 values: 10^12 points. The API must refuse it by the product of the axis
# lengths (UNROLL_MAX_SWEEP_JOBS), before it expands or validates a single point.
HOSTILE_SWEEP = {
    "name": "hostile",
    "base": B_JOB,
    "grid": {
        "train.lr": [round(1e-4 * (i + 1), 6) for i in range(1000)],
        "train.seed": list(range(1000)),
        "model.hidden_size": [8 + i for i in range(1000)],
        "data.lag": [1 + i for i in range(1000)],
    },
}

TERMINAL = {"succeeded", "failed", "cancelled"}
POLL_S = 0.01  # B's watch of its job
PROBE_S = 0.02  # the /healthz prober's pause between requests
JOB_TIMEOUT_S = 60.0  # a B job not running by then counts as this long, and is cancelled

# Latencies by the performance counter: uvloop's loop.time() moves in whole milliseconds.
clock = time.perf_counter


# --- a minimal HTTP/1.1 keep-alive client ----------------------------------------------------
# bench/api.py's, for any request: it costs little CPU next to the servers on the same cores.


class Http:
    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One request; (status, body). A broken connection is reopened on the next call."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{self.auth}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        try:
            self.writer.write(head.encode() + b"\r\n" + (body or b""))
            response = await self.reader.readuntil(b"\r\n\r\n")
            status, length, close = _parse_head(response)
            data = await self.reader.readexactly(length) if length else b""
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self.close()
            raise
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    status, length, close = int(head[9:12]), 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    return status, length, close


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- project A: the attacker, in a process of its own -----------------------------------------


class Counts:
    def __init__(self) -> None:
        self.by_kind: dict[str, dict[str, int]] = {}

    def add(self, kind: str, status: int | str) -> None:
        kinds = self.by_kind.setdefault(kind, {})
        kinds[str(status)] = kinds.get(str(status), 0) + 1


_JOB_ID = re.compile(rb'"id":"(job_[0-9a-f]+)"')


async def _flood_posts(http: Http, body: bytes, path: str, kind: str, counts: Counts, ids: list[str], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            status, data = await http.request("POST", path, body)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            counts.add(kind, type(exc).__name__)
            await asyncio.sleep(0.05)
            continue
        counts.add(kind, status)
        if status == 201 and len(ids) < 10_000 and (found := _JOB_ID.search(data)):
            ids.append(found.group(1).decode())


async def _stream_once(port: int, token: str, job_id: str, hold_s: float, stop: asyncio.Event) -> int:
    """Open a job's event stream; hold it for `hold_s` reading what comes; the status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            "Accept: text/event-stream\r\nConnection: close\r\n\r\n".encode()
        )
        status = int((await reader.readuntil(b"\r\n\r\n"))[9:12])
        if status == 200:
            until = clock() + hold_s
            while not stop.is_set() and (left := until - clock()) > 0:
                try:
                    if not await asyncio.wait_for(reader.read(65536), timeout=min(left, 0.2)):
                        break  # the server ended the stream
                except TimeoutError:
                    pass
        return status
    finally:
        writer.close()


async def _flood_streams(port: int, token: str, ids: list[str], hold_s: float, counts: Counts, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if not ids:
            await asyncio.sleep(0.01)
            continue
        try:
            status = await _stream_once(port, token, random.choice(ids[-200:]), hold_s, stop)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            counts.add("stream", type(exc).__name__)
            await asyncio.sleep(0.05)
            continue
        counts.add("stream", status)


async def _attack(mode: str, port: int, token: str, options: dict, stop_flag, ready_flag) -> dict:
    stop = asyncio.Event()
    counts = Counts()
    ids: list[str] = []
    tasks = []
    if mode == "sweep":
        body = json.dumps(HOSTILE_SWEEP).encode()
        tasks += [_flood_posts(Http(port, token), body, "/v1/sweeps", "sweep", counts, ids, stop) for _ in range(options["sweep_connections"])]
    elif mode == "flood":
        body = json.dumps(A_JOB).encode()
        tasks += [_flood_posts(Http(port, token), body, "/v1/jobs", "submit", counts, ids, stop) for _ in range(options["a_connections"])]
        tasks += [_flood_streams(port, token, ids, options["hold"], counts, stop) for _ in range(options["a_streams"])]
    started = clock()
    running = [asyncio.ensure_future(t) for t in tasks]
    ready_flag.set()
    while not stop_flag.is_set():
        await asyncio.sleep(0.05)
    stop.set()
    elapsed = clock() - started
    _, pending = await asyncio.wait(running, timeout=10)
    for task in pending:
        task.cancel()
    return {"seconds": elapsed, "statuses": counts.by_kind}


def attacker(mode: str, port: int, token: str, options: dict, stop_flag, ready_flag, results) -> None:
    """Project A (the child process's entry point)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    results.put(asyncio.run(_attack(mode, port, token, options, stop_flag, ready_flag)))


# --- project B and the prober: the measurements ------------------------------------------------


def _server_time(text: str | None) -> float | None:
    return datetime.fromisoformat(text).timestamp() if text else None


async def project_b(port: int, token: str, jobs: int, seconds: float) -> dict:
    """B's jobs, one at a time, spread over `seconds`: submit -> running, and every request's latency."""
    http = Http(port, token)
    body = json.dumps(B_JOB).encode()
    api: list[float] = []
    to_running: list[float] = []
    server_to_running: list[float] = []
    statuses: dict[str, int] = {}
    timeouts = 0

    async def timed(method: str, path: str, payload: bytes | None = None) -> tuple[int, bytes]:
        started = clock()
        try:
            status, data = await http.request(method, path, payload)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
            return 0, b""
        api.append(clock() - started)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        return status, data

    start = clock()
    for i in range(jobs):
        delay = start + i * seconds / jobs - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        submitted = clock()
        status, data = await timed("POST", "/v1/jobs", body)
        if status != 201:
            continue
        job_id = json.loads(data)["id"]
        running_seen = False
        while True:
            status, data = await timed("GET", f"/v1/jobs/{job_id}")
            job = json.loads(data) if status == 200 else {}
            state = job.get("state")
            if not running_seen and state not in (None, "queued"):
                running_seen = True
                to_running.append(clock() - submitted)
            if state in TERMINAL:
                if job.get("started_at"):
                    server_to_running.append(_server_time(job["started_at"]) - _server_time(job["created_at"]))
                break
            if clock() - submitted > JOB_TIMEOUT_S:
                timeouts += 1
                if not running_seen:
                    to_running.append(clock() - submitted)
                await timed("POST", f"/v1/jobs/{job_id}/cancel")
                break
            await asyncio.sleep(POLL_S)
    http.close()
    return {"to_running_s": to_running, "server_to_running_s": server_to_running, "api_s": api,
            "statuses": statuses, "timeouts": timeouts, "seconds": clock() - start}


async def prober(port: int, stop: asyncio.Event) -> dict:
    http = Http(port)
    latencies: list[float] = []
    errors = 0
    while not stop.is_set():
        started = clock()
        try:
            status, _ = await http.request("GET", "/healthz")
        except (OSError, asyncio.IncompleteReadError) as exc:
            errors += 1
            print(f"  healthz: {type(exc).__name__}", flush=True)
            await asyncio.sleep(PROBE_S)
            continue
        latencies.append(clock() - started)
        errors += status != 200
        await asyncio.sleep(PROBE_S)
    http.close()
    return {"healthz_s": latencies, "errors": errors}


async def measure(port: int, token: str, jobs: int, seconds: float) -> tuple[dict, dict]:
    stop = asyncio.Event()
    probe = asyncio.create_task(prober(port, stop))
    try:
        b = await project_b(port, token, jobs, seconds)
    finally:
        stop.set()
    return b, await probe


# --- the services -------------------------------------------------------------------------------


class Stack:
    """Ray head, PostgreSQL database, `unroll api` and `unroll worker` of this run."""

    def __init__(self, work: Path) -> None:
        from service.cli.machine import ray_token_env
        from service.store.db.migrate import upgrade

        self.work = work
        self.procs: list[subprocess.Popen] = []
        self.database_url = create_postgres_database("unroll_bench_tenancy")
        upgrade(self.database_url)
        self.ray_port, self.api_port = free_port(), free_port()
        self.prefix = f"bench-tenancy-{secrets.token_hex(4)}"
        self.ray_temp = f"/tmp/ray-bench-tenancy-{secrets.token_hex(3)}"  # short: Ray's socket paths live under it
        os.environ.update(ray_token_env(work / "ray-auth-token"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("UNROLL_")}
        self.env.update({
            "PYTHONPATH": str(ROOT),
            "UNROLL_DATABASE_URL": self.database_url,
            "UNROLL_REDIS_URL": REDIS_URL,
            "UNROLL_REDIS_PREFIX": self.prefix,
            "UNROLL_RAY_ADDRESS": f"127.0.0.1:{self.ray_port}",
            "UNROLL_ARTIFACTS": str(work / "artifacts"),
            "UNROLL_ADMIN_TOKEN": ADMIN_TOKEN,
            "UNROLL_MAX_QUEUED_PER_PROJECT": str(10**9),
            "UNROLL_LOG_LEVEL": "warning",
        })

    def start(self, *cmd: str, name: str) -> subprocess.Popen:
        log = (self.work / f"{name}.log").open("w")
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def up(self, worker_nice: int = 0) -> None:
        py = sys.executable
        niced = ["nice", "-n", str(worker_nice)] if worker_nice else []
        command, _ = ray_head(self.ray_port, self.ray_temp)
        self.start(*niced, *command, name="ray")  # the training processes are Ray's children
        wait(lambda: listening(self.ray_port), 120, "the Ray head")
        self.start(py, "-m", "service.cli", "api", "--port", str(self.api_port), name="api")
        self.start(*niced, py, "-m", "service.cli", "worker", name="worker")
        wait(lambda: self.get("/readyz").status_code == 200, 180, "unroll api and worker (/readyz)")

    def get(self, path: str):
        import httpx

        try:
            return httpx.get(f"http://127.0.0.1:{self.api_port}{path}", timeout=2)
        except httpx.HTTPError:
            return httpx.Response(599)

    def admin(self, method: str, path: str, body: dict) -> dict:
        import httpx

        response = httpx.request(method, f"http://127.0.0.1:{self.api_port}{path}", json=body,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
        response.raise_for_status()
        return response.json()

    def down(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        try:
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i:i + 1000])
        except Exception as exc:  # noqa: BLE001
            print(f"could not delete the Redis keys {self.prefix}:*: {exc}")
        drop_postgres_database(self.database_url)
        shutil.rmtree(self.ray_temp, ignore_errors=True)


def wait(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.3)
    raise RuntimeError(f"{what} not ready in {timeout}s")


def run_phase(name: str, stack: Stack, tokens: dict[str, str], args: argparse.Namespace) -> dict:
    mode = {"sweep": "sweep", "flood": "flood"}.get(name)
    child = None
    if mode is not None:
        context = multiprocessing.get_context("spawn")
        stop_flag, ready_flag, results = context.Event(), context.Event(), context.Queue()
        options = {"a_connections": args.a_connections, "a_streams": args.a_streams, "hold": args.hold,
                   "sweep_connections": args.sweep_connections}
        child = context.Process(target=attacker, args=(mode, stack.api_port, tokens["a"], options, stop_flag, ready_flag, results))
        child.start()
        if not ready_flag.wait(60):
            raise RuntimeError(f"project A's {mode} did not start")
        time.sleep(1.0)  # let the attack reach its pace before measuring
    load_before = os.getloadavg()[0]
    b, probe = asyncio.run(measure(stack.api_port, tokens["b"], args.b_jobs, args.seconds))
    attack = {"seconds": 0.0, "statuses": {}}
    if child is not None:
        stop_flag.set()
        attack = results.get(timeout=60)
        child.join(30)
    a_done = sum(n for kinds in attack["statuses"].values() for n in kinds.values())
    a_429 = sum(kinds.get("429", 0) for kinds in attack["statuses"].values())
    phase = {
        "phase": name,
        "b_jobs": len(b["to_running_s"]),
        "b_timeouts": b["timeouts"],
        "b_to_running_p50_ms": ms(percentile(b["to_running_s"], 0.5)),
        "b_to_running_p99_ms": ms(percentile(b["to_running_s"], 0.99)),
        "b_server_to_running_p50_ms": ms(percentile(b["server_to_running_s"], 0.5)),
        "b_api_p50_ms": ms(percentile(b["api_s"], 0.5)),
        "b_api_p99_ms": ms(percentile(b["api_s"], 0.99)),
        "b_requests": len(b["api_s"]),
        "b_statuses": b["statuses"],
        "healthz_p50_ms": ms(percentile(probe["healthz_s"], 0.5)),
        "healthz_p99_ms": ms(percentile(probe["healthz_s"], 0.99)),
        "healthz_requests": len(probe["healthz_s"]),
        "healthz_errors": probe["errors"],
        "a_requests": a_done,
        "a_429": a_429,
        "a_per_s": a_done / attack["seconds"] if attack["seconds"] else 0.0,
        "a_statuses": attack["statuses"],
        "seconds": b["seconds"],
        "loadavg_1m_before": load_before,
        "b_to_running_s": b["to_running_s"],
    }
    print(f"  {name:6s} B submit->running p50 {fmt(phase['b_to_running_p50_ms'])} ms, B API p99 {fmt(phase['b_api_p99_ms'])} ms,"
          f" healthz p99 {fmt(phase['healthz_p99_ms'])} ms; A {a_done} requests ({phase['a_per_s']:.0f}/s) {attack['statuses']}", flush=True)
    return phase


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--b-jobs", type=int, default=30, help="B's jobs per phase, one at a time")
    parser.add_argument("--a-connections", type=int, default=32, help="connections on which A POSTs jobs back to back")
    parser.add_argument("--a-streams", type=int, default=40, help="A's tasks opening event streams")
    parser.add_argument("--hold", type=float, default=2.0, help="seconds A holds each event stream it gets")
    parser.add_argument("--sweep-connections", type=int, default=8, help="connections on which A POSTs the hostile sweep")
    parser.add_argument("--setting", action="append", default=[], metavar="UNROLL_NAME=VALUE",
                        help="a setting of the API and worker under test, e.g. UNROLL_REQUESTS_IN_PROGRESS_PER_PROJECT=1 (repeatable)")
    parser.add_argument("--worker-nice", type=int, default=0, choices=range(20), metavar="0..19",
                        help="run Ray (the training) and `unroll worker` at this niceness: the CPU split of a"
                        " deployment, where the API does not share its cores with training (0: all equal)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tenancy.json")
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.setting)
    if not all(name.startswith("UNROLL_") for name in settings):
        parser.error("--setting: UNROLL_NAME=VALUE")

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    work = Path(tempfile.mkdtemp(prefix="unroll-bench-tenancy-"))
    load_before = os.getloadavg()
    stack = Stack(work)
    stack.env.update(settings)
    phases: list[dict] = []
    try:
        stack.up(args.worker_nice)
        tokens = {p: stack.admin("POST", f"/v1/admin/projects/tenancy-{p}/tokens", {"name": "bench"})["token"] for p in ("a", "b")}
        stack.admin("PATCH", "/v1/admin/projects/tenancy-a", {"max_running": 1})
        # Warm up: Ray's worker processes import torch once; B's first requests open its pool.
        asyncio.run(measure(stack.api_port, tokens["b"], 4, 0.5))
        for name in ("quiet", "sweep", "flood", "after"):
            phases.append(run_phase(name, stack, tokens, args))
    finally:
        stack.down()
    load_after = os.getloadavg()

    by_name = {p["phase"]: p for p in phases}
    flood, sweep = by_name["flood"], by_name["sweep"]
    targets_met = {
        "flood: B submit->running p50 < 1 s": flood["b_to_running_p50_ms"] is not None and flood["b_to_running_p50_ms"] < 1000,
        "flood: B API p99 < 50 ms": flood["b_api_p99_ms"] is not None and flood["b_api_p99_ms"] < 50,
        "sweep: healthz p99 < 50 ms": sweep["healthz_p99_ms"] is not None and sweep["healthz_p99_ms"] < 50,
    }
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; one API process;"
          f" Ray head of 2 CPUs; A: max_running 1, {args.a_connections} submitting connections, {args.a_streams} stream tasks")
    header = f"{'phase':8s}{'B submit->running ms':>22s}{'B API ms':>16s}{'healthz ms':>16s}{'A requests':>12s}{'A 429s':>9s}"
    print(header)
    print(f"{'':8s}{'p50 / p99':>22s}{'p50 / p99':>16s}{'p50 / p99':>16s}")
    for p in phases:
        print(f"{p['phase']:8s}{fmt(p['b_to_running_p50_ms']) + ' / ' + fmt(p['b_to_running_p99_ms']):>22s}"
              f"{fmt(p['b_api_p50_ms']) + ' / ' + fmt(p['b_api_p99_ms']):>16s}"
              f"{fmt(p['healthz_p50_ms']) + ' / ' + fmt(p['healthz_p99_ms']):>16s}{p['a_requests']:>12d}{p['a_429']:>9d}")
    for p in phases:
        print(f"  {p['phase']}: B {p['b_jobs']} jobs ({p['b_timeouts']} past {JOB_TIMEOUT_S:.0f} s), {p['b_requests']} requests {p['b_statuses']};"
              f" server-side created->started p50 {fmt(p['b_server_to_running_p50_ms'])} ms; healthz {p['healthz_requests']} requests,"
              f" {p['healthz_errors']} errors; A {p['a_per_s']:.0f}/s {p['a_statuses']}; load {p['loadavg_1m_before']:.1f}")
    for name, met in targets_met.items():
        print(f"  {'PASS' if met else 'MISS'}  {name}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} cores; logs in {work}")

    result = {
        "phases": phases,
        "targets_met": targets_met,
        "settings": vars(args) | {"out": str(args.out), "a_job": A_JOB, "b_job": B_JOB,
                                  "hostile_sweep_points": 1000**4, "poll_s": POLL_S, "probe_s": PROBE_S},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "database": "postgresql",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
