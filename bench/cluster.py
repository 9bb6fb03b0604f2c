"""Cluster benchmark (not a test): the compose layout as processes on this machine
(tests/cluster/harness.py: a throwaway PostgreSQL database, the machine's Redis under a
prefix of its own, `unroll db upgrade`, two API replicas, a Ray head and two more Ray
nodes of 1 CPU each, two dispatchers).

    .venv/bin/python bench/cluster.py [--kills 3] [--submissions 60] [--clients 8]

- recovery: two jobs of 1 CPU on the three nodes (one CPU stays free for the victim);
  once one runs on a node other than the head and has stored a checkpoint, that node's raylet is killed (kill -9). Measured: from
  the kill to the job's next attempt claimed (running again, its Ray task submitted) and
  to that attempt's trainer having loaded the checkpoint (its "attempt 2 on ..., resuming
  at step N" log line in the database; logs are flushed about once a second). The node is started again between
  kills. Ray's health checks are shortened as in the tests (3 missed checks of 1 s).
- submission: --submissions POST /v1/jobs on --clients threads, through one replica, then
  through both (the client rotates between them). The jobs ask for a GPU no node has, so
  they stay queued and run nothing; they are cancelled afterwards.

Prints a table and writes bench/results/cluster.json. Everything shares the machine's
cores with the services it measures: compare the two submission rows of one run, not
absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.cli.machine import ray_token_env
from service.store.db.models import JobState
from tests.cluster.harness import Cluster, wait_for
from tests.cluster.jobs import Records, Replicas, tiny_config
from tests.cluster.layout import read_layout
from tests.processes import create_postgres_database, drop_postgres_database

RESULTS = ROOT / "bench" / "results" / "cluster.json"


def node_running(cluster: Cluster, records: Records, job_id: str) -> str | None:
    for line in records.runs(job_id):
        if (pid := re.search(r"pid (\d+)", line)) is not None:
            return cluster.node_of(int(pid.group(1)))
    return None


def one_kill(cluster: Cluster, api: Replicas, records: Records) -> dict[str, float]:
    # Two jobs on three nodes of one CPU: the killed node's job has a free CPU to go to, so
    # what is measured is the recovery, not the wait for another job to end.
    ids = [api.submit(tiny_config(400, seed=i))["id"] for i in range(2)]
    victim_job, node = wait_for(
        lambda: next(((j, n) for j in ids if records.checkpointed(j) and (n := node_running(cluster, records, j)) not in (None, "head")), None),
        120, "a job with a checkpoint on a node other than the head", cluster.logs)
    killed = time.monotonic()
    cluster.kill_raylet(node)
    wait_for(lambda: (j := records.job(victim_job)).attempt >= 2 and j.state == JobState.RUNNING, 120, "the job claimed again", cluster.logs)
    claimed = time.monotonic() - killed
    wait_for(lambda: any(line.startswith("attempt 2 on ") for line in records.runs(victim_job)), 120, "the trainer resumed", cluster.logs)
    resumed = time.monotonic() - killed
    for job_id in ids:
        api.request("POST", f"/v1/jobs/{job_id}/cancel")
    cluster.nodes[node].kill()
    cluster.start_node(node, cpus=1, gpus=0)
    cluster.wait_node(node, joined=True)
    return {"claimed_again_s": claimed, "trainer_resumed_s": resumed}


def submissions(urls: list[str], token: str, count: int, clients: int) -> float:
    api = Replicas(urls, token)
    config = tiny_config(5, resources={"cpus": 1, "gpus": 1})  # no node holds it: stays queued
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            ids = list(pool.map(lambda _: api.submit(config)["id"], range(count)))
        rate = count / (time.perf_counter() - start)
        for job_id in ids:
            api.request("POST", f"/v1/jobs/{job_id}/cancel")
        return rate
    finally:
        api.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--submissions", type=int, default=60)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    os.environ.update(ray_token_env(Path(tempfile.mkdtemp(prefix="unroll-bench-ray-")) / "auth_token"))
    url = create_postgres_database("unroll_bench_cluster")
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="unroll-bench-cluster-")), url, os.environ.get("UNROLL_REDIS_URL", "redis://127.0.0.1:6379/0"), read_layout())
    try:
        cluster.start(gpu_node=False)
        cluster.start_node("n2", cpus=1, gpus=0)
        cluster.wait_node("n2", joined=True)
        records = Records(url)
        api = Replicas([f"http://127.0.0.1:{a.port}" for a in cluster.apis], cluster.token)
        kills = [one_kill(cluster, api, records) for _ in range(args.kills)]
        urls = [f"http://127.0.0.1:{a.port}" for a in cluster.apis]
        one = submissions(urls[:1], cluster.token, args.submissions, args.clients)
        two = submissions(urls, cluster.token, args.submissions, args.clients)
        api.close()
        records.close()
    finally:
        cluster.stop()
        drop_postgres_database(url)
    report(kills, one, two, args)
    return 0


def report(kills: list[dict[str, float]], one: float, two: float, args: argparse.Namespace) -> None:
    rows = {}
    for key in ("claimed_again_s", "trainer_resumed_s"):
        values = [k[key] for k in kills]
        rows[key] = {"p50": statistics.median(values), "max": max(values), "runs": values}
    print(f"{'node death ->':<28}{'p50 s':>8}{'max s':>8}")
    print(f"{'  next attempt claimed':<28}{rows['claimed_again_s']['p50']:>8.1f}{rows['claimed_again_s']['max']:>8.1f}")
    print(f"{'  trainer resumed (logged)':<28}{rows['trainer_resumed_s']['p50']:>8.1f}{rows['trainer_resumed_s']['max']:>8.1f}")
    print(f"{'submissions/s, 1 replica':<28}{one:>8.1f}")
    print(f"{'submissions/s, 2 replicas':<28}{two:>8.1f}{two / one:>7.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "when": datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(), "cpus": os.cpu_count(),
        "recovery": rows, "submissions_per_s": {"one_replica": one, "two_replicas": two},
        "args": vars(args),
    }, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    raise SystemExit(main())
