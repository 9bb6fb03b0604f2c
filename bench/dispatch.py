"""Dispatch benchmark (not a test): submit → running latency and tiny-job throughput
through the whole system (HTTP → database → Redis → dispatcher → Ray → trainer →
database), next to Ray's job submission API doing the same trivial work in the same run.

    .venv/bin/python bench/dispatch.py [--jobs 100] [--latency-samples 30] [--quick]

Starts its own Ray head (with the dashboard, which Ray's job API needs), a throwaway
PostgreSQL database (SQLite if no server answers), `unroll api` and `unroll worker`,
and stops them all. Prints a table and writes bench/results/dispatch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import create_postgres_database, drop_postgres_database, free_port, ray_head  # noqa: E402

import psycopg  # noqa: E402

from service.cli.client import Client  # noqa: E402
from service.store.db.migrate import upgrade  # noqa: E402
from service.cli.machine import ray_token_env  # noqa: E402

RUN_TAG = f"bench-{secrets.token_hex(3)}"
TINY = {
    "name": "tiny",
    "tags": [RUN_TAG],
    "model": {"hidden_size": 8},
    "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 200, "batch_size": 2, "valid_length": 16},
    "tbptt": {"k1": 4},
    "train": {"max_steps": 1, "eval_every": 0, "checkpoint_every": 0, "device": "cpu"},
    # One CPU each (the default): Ray keeps one warm worker process per CPU; fractional
    # tasks beyond that start processes that Ray kills again when idle.
    "resources": {"cpus": 1},
}




def wait_http(url: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer in {timeout}s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Stack:
    def __init__(self, work: Path):
        self.work = work
        self.procs: list[subprocess.Popen] = []
        self.postgres = True
        try:
            self.database_url = create_postgres_database("unroll_bench")
        except psycopg.Error:
            self.postgres = False
            self.database_url = f"sqlite:///{work / 'unroll.db'}"
        upgrade(self.database_url)
        self.ray_port, self.dash_port, self.api_port = free_port(), free_port(), free_port()
        # Ray's token of this run (a fresh machine has no ~/.ray/auth_token), for the head,
        # our processes, and Ray's job client in this process.
        os.environ.update(ray_token_env(work / "ray-auth-token"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("UNROLL_")}
        self.env.update({
            "UNROLL_DATABASE_URL": self.database_url,
            "UNROLL_REDIS_PREFIX": f"bench-{secrets.token_hex(4)}",
            "UNROLL_RAY_ADDRESS": f"127.0.0.1:{self.ray_port}",
            "UNROLL_ARTIFACTS": str(work / "artifacts"),
            "UNROLL_LOG_LEVEL": "warning",
        })

    def start(self, *cmd: str, name: str) -> subprocess.Popen:
        log = (self.work / f"{name}.log").open("w")
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def up(self) -> tuple[str, str]:
        py = sys.executable
        command, _ = ray_head(self.ray_port, f"/tmp/ray-bench-{secrets.token_hex(2)}", dashboard_port=self.dash_port)
        self.start(*command, name="ray")
        wait_http(f"http://127.0.0.1:{self.dash_port}/api/version", timeout=180)
        token = subprocess.run([py, "-m", "service.cli", "token", "create", "--project", "bench"], cwd=ROOT, env=self.env,
                               capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        self.start(py, "-m", "service.cli", "api", "--port", str(self.api_port), name="api")
        wait_http(f"http://127.0.0.1:{self.api_port}/healthz")
        self.start(py, "-m", "service.cli", "worker", name="worker")
        return f"http://127.0.0.1:{self.api_port}", token

    def down(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if self.postgres:
            drop_postgres_database(self.database_url)


def wait_done(client: Client, job_ids: list[str], timeout: float = 600) -> list[dict]:
    """Poll the job list (one request per round, not one per job: the load generator
    shares the 2 cores with the system it measures)."""
    deadline = time.monotonic() + timeout
    done: dict[str, dict] = {}
    wanted = set(job_ids)
    while len(done) < len(job_ids) and time.monotonic() < deadline:
        for job in client.list(tag=RUN_TAG, limit=1000)["jobs"]:
            if job["id"] in wanted and job["state"] in ("succeeded", "failed", "cancelled"):
                done[job["id"]] = job
        time.sleep(0.1)
    if len(done) < len(job_ids):
        raise RuntimeError(f"{len(job_ids) - len(done)} jobs not finished in {timeout}s")
    return [done[j] for j in job_ids]


def unroll_latency(client: Client, samples: int) -> list[float]:
    """Submit one job at a time to a warm, idle worker: created_at → started_at."""
    latencies = []
    for _ in range(samples):
        job = client.submit(TINY)
        (final,) = wait_done(client, [job["id"]])
        latencies.append(parse_time(final["started_at"]) - parse_time(final["created_at"]))
    return latencies


def unroll_throughput(client: Client, count: int) -> tuple[float, int, dict[str, float]]:
    """Jobs per second from the first submission to the last finish, the number that
    succeeded, and where the time went (medians over the jobs, in seconds)."""
    start = time.time()
    with ThreadPoolExecutor(8) as pool:
        ids = [job["id"] for job in pool.map(lambda _: client.submit(TINY), range(count))]
    submitted = time.time()
    jobs = wait_done(client, ids)
    end = max(parse_time(j["finished_at"]) for j in jobs)
    detail = {
        "submit_all_s": submitted - start,
        "run_s_median": statistics.median(parse_time(j["finished_at"]) - parse_time(j["started_at"]) for j in jobs),
        "slot_s": 2 * (end - start) / count,  # wall time per job per CPU slot (2 slots)
    }
    return count / (end - start), sum(j["state"] == "succeeded" for j in jobs), detail


def ray_jobs(dash_port: int, samples: int, count: int) -> dict:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(f"http://127.0.0.1:{dash_port}")
    entry = f"{sys.executable} -c pass"

    def wait(job_id: str, states: set) -> float:
        while True:
            status = client.get_job_status(job_id)
            if status in states:
                return time.monotonic()
            time.sleep(0.01)

    latencies = []
    for _ in range(samples):
        t0 = time.monotonic()
        job_id = client.submit_job(entrypoint=entry)
        latencies.append(wait(job_id, {JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED}) - t0)
        wait(job_id, {JobStatus.SUCCEEDED, JobStatus.FAILED})
    t0 = time.monotonic()
    ids = [client.submit_job(entrypoint=entry) for _ in range(count)]
    for job_id in ids:
        wait(job_id, {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED})
    return {"latencies": latencies, "jobs_per_s": count / (time.monotonic() - t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100, help="tiny jobs for the throughput run")
    parser.add_argument("--latency-samples", type=int, default=30)
    parser.add_argument("--ray-jobs", type=int, default=20, help="jobs for Ray's job API (each starts a process)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dispatch.json")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.latency_samples, args.ray_jobs = 30, 10, 5

    work = Path(tempfile.mkdtemp(prefix="unroll-bench-"))
    stack = Stack(work)
    try:
        url, token = stack.up()
        client = Client(url, token)
        wait_done(client, [client.submit(TINY)["id"] for _ in range(4)])  # warm: Ray workers import torch once
        latencies = unroll_latency(client, args.latency_samples)
        throughput, succeeded, detail = unroll_throughput(client, args.jobs)
        ray = ray_jobs(stack.dash_port, max(3, args.latency_samples // 3), args.ray_jobs)
    finally:
        stack.down()

    rows = [
        ("submit → running p50 (s)", statistics.median(latencies), statistics.median(ray["latencies"]), "< 0.25"),
        ("submit → running p95 (s)", percentile(latencies, 0.95), percentile(ray["latencies"], 0.95), ""),
        ("tiny jobs / s, end to end", throughput, ray["jobs_per_s"], ">= 20"),
    ]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; database: {stack.database_url.split(':')[0]}")
    print(f"{'measure':32} {'unroll':>10} {'Ray jobs API':>14} {'target':>8}")
    for name, ours, theirs, target in rows:
        print(f"{name:32} {ours:10.3f} {theirs:14.3f} {target:>8}")
    print(f"({succeeded}/{args.jobs} tiny jobs succeeded; submitting them took {detail['submit_all_s']:.2f} s;"
          f" a job ran {detail['run_s_median'] * 1000:.0f} ms (median) and held a CPU slot {detail['slot_s'] * 1000:.0f} ms;"
          f" logs in {work})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "unroll": {"latencies_s": latencies, "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 0.95),
                   "jobs_per_s": throughput, "succeeded": succeeded, "jobs": args.jobs, **detail},
        "ray_jobs_api": {"latencies_s": ray["latencies"], "p50_s": statistics.median(ray["latencies"]),
                         "p95_s": percentile(ray["latencies"], 0.95), "jobs_per_s": ray["jobs_per_s"]},
        "database": stack.database_url.split(":")[0], "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
