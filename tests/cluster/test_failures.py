"""Losing any part of the deployed cluster loses no job (issue 20). One cluster in the
compose layout (tests/cluster/conftest.py) serves the scenarios in this order; in each,
every job succeeds exactly once (its attempts never overlap, each attempt's trainer starts
once) with the per-step losses of an undisturbed run.

Which node runs a job is read from the job's log ("... on cpu, pid N": the attempt's Ray
worker process) and the process tree: a Ray worker is a child of its node's raylet."""

from __future__ import annotations

import itertools
import re
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import psycopg
import pytest
import redis
import sqlalchemy as sa

from service.store.db.models import Job, JobState
from tests.cluster.harness import wait_for
from tests.cluster.jobs import TERMINAL, tiny_config, undisturbed_losses
from workers.ddp import rank_pids

pytestmark = [pytest.mark.cluster, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(240)]

LONG = 300  # updates: 3-25 s on one CPU here (a checkpoint every 10), far from the end when killed
KILL_AT = 12  # past the first checkpoint: a resumed attempt starts at step 10


def running_on(cluster, records, job_id: str, attempt: int) -> str | None:
    """The node running `attempt` of the job, from its start line's pid; None until logged."""
    for line in records.runs(job_id):
        if line.startswith(f"attempt {attempt} on ") and (pid := re.search(r"pid (\d+)", line)):
            return cluster.node_of(int(pid.group(1)))
    return None


def waiting_because(records, job_id: str, attempt: int, words: str) -> Job | None:
    job = records.job(job_id)
    return job if job.state == JobState.QUEUED and job.attempt == attempt and words in (job.pending_reason or "") else None


def described(job: Job) -> str:
    """What a scenario's timeout says of the job it waited for."""
    return f"job {job.id}: {job.state.value}, attempt {job.attempt}, pending_reason {job.pending_reason!r}, not_before {job.not_before}"


def test_a_gpu_job_waits_for_a_gpu_node_runs_there_and_waits_again_while_it_is_gone(cluster, api, records):
    # Alone on its node it trains 300 updates in a few seconds, which could end before the
    # kill landed (the job then simply succeeded): three times as many.
    config = tiny_config(3 * LONG, resources={"cpus": 1, "gpus": 1})
    job_id = api.submit(config)["id"]
    job = wait_for(lambda: waiting_because(records, job_id, 0, "no node can hold"), 60, "the GPU job's pending reason", cluster.logs)
    assert "1 GPU" in job.pending_reason, job.pending_reason

    cluster.start_node("gpu", cpus=1, gpus=cluster.layout.node_gpus)
    records.wait(job_id, {JobState.RUNNING}, step=KILL_AT, logs=cluster.logs)
    records.wait_checkpointed(job_id, cluster.logs)
    assert running_on(cluster, records, job_id, 1) == "gpu"
    # Ray scheduled it against the declared GPU; no GPU exists here, and the job says so.
    assert " on cpu, pid " in records.runs(job_id)[0], records.runs(job_id)

    cluster.kill_raylet("gpu")  # the GPU node leaves mid-job
    wait_for(lambda: waiting_because(records, job_id, 1, "no node can hold"), 60, "the GPU job waiting again",
             lambda: f"{described(records.job(job_id))}\n{cluster.logs()}")
    cluster.nodes["gpu"].kill()
    cluster.start_node("gpu", cpus=1, gpus=cluster.layout.node_gpus)
    job = records.assert_exactly_once(job_id, config, cluster.logs)
    assert job.attempt == 2 and records.resumed(job_id), records.runs(job_id)


def test_a_killed_raylet_s_jobs_resume_on_other_nodes(cluster, api, records):
    config = tiny_config(LONG)
    # Ray keeps CPU jobs off GPU nodes while others fit: one on the head, one on node cpu.
    ids = [api.submit(config)["id"] for _ in range(2)]
    on_cpu = wait_for(lambda: [j for j in ids if records.checkpointed(j) and running_on(cluster, records, j, 1) == "cpu"],
                      90, "a job running on node cpu", cluster.logs)
    cluster.kill_raylet("cpu")
    for job_id in ids:
        job = records.assert_exactly_once(job_id, config, cluster.logs)
        if job_id in on_cpu:
            assert job.attempt == 2 and [a.outcome.value for a in records.attempts(job_id)] == ["lost", "succeeded"]
            assert records.resumed(job_id) and running_on(cluster, records, job_id, 2) in ("head", "gpu", None), records.runs(job_id)
    cluster.nodes["cpu"].kill()


def test_a_killed_dispatcher_s_jobs_are_taken_over_by_the_other(cluster, api, records):
    # Long enough that the killed dispatcher's attempt cannot finish before Ray ends it.
    config = tiny_config(2 * LONG, train={"seed": 4})
    ids = [api.submit(config)["id"] for _ in range(2)]
    for job_id in ids:
        records.wait(job_id, {JobState.RUNNING}, step=KILL_AT, logs=cluster.logs)
        records.wait_checkpointed(job_id, cluster.logs)
    names = {f"{socket.gethostname()}:{d.proc.pid}": d for d in cluster.dispatchers if d.alive()}
    holders = {job_id: records.attempts(job_id)[-1].worker for job_id in ids}
    victim = next(name for name in names if name in holders.values())
    names[victim].kill()  # kill -9: Ray ends the tasks it owns; their leases expire
    for job_id in ids:
        job = records.assert_exactly_once(job_id, config, cluster.logs)
        workers = [a.worker for a in records.attempts(job_id)]
        if holders[job_id] == victim:
            assert job.attempt == 2 and workers[-1] != victim and workers[-1] in names, workers
            assert records.resumed(job_id), records.runs(job_id)
    cluster.start_dispatcher()  # two again, for the next scenarios (it joins when ready)


def test_a_killed_api_replica_under_load_loses_and_duplicates_no_submission(cluster, api, records):
    config = tiny_config(5, train={"checkpoint_every": 0})
    keys = [f"load-{secrets.token_hex(4)}-{i}" for i in range(20)]
    done: list[str] = []

    def submit(key: str) -> tuple[str, str]:
        time.sleep(0.2)  # a steady load: 4 clients, 5 submissions a second each
        job_id = api.submit(config, key)["id"]  # a replica gone mid-request: the next, same key
        done.append(key)
        return key, job_id

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(submit, key) for key in keys]
        wait_for(lambda: len(done) >= 4, 60, "submissions under way")
        cluster.apis[0].kill()
        answered = dict(f.result() for f in futures)
    assert api.failovers > 0  # some request did find the killed replica gone
    again = api.submit(config, keys[0])  # a client's retry of an answered submission
    assert again["id"] == answered[keys[0]]
    with records.sessions.begin() as session:
        stored = session.execute(sa.select(Job.idempotency_key, Job.id).where(Job.idempotency_key.in_(keys))).all()
    assert sorted(stored) == sorted(answered.items())  # every key once, the job its client was given
    for job_id in answered.values():
        assert records.assert_exactly_once(job_id, config, cluster.logs).attempt == 1
    cluster.apis[0] = cluster.start_api()


def _terminate_database_connections(url: str) -> int:
    name = sa.make_url(url).database
    admin = sa.make_url(url).set(database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchall()
    return len(rows)


def _kill_redis_connections(cluster) -> int:
    """CLIENT KILL every Redis connection of the cluster's processes (the server is shared:
    FLUSHALL or a restart is not ours to do)."""
    port = cluster.redis.connection_pool.connection_kwargs.get("port", 6379)
    mine = set()
    for service in cluster.services:
        if not service.alive():
            continue
        for proc in [psutil.Process(service.proc.pid), *psutil.Process(service.proc.pid).children(recursive=True)]:
            try:
                mine.update(f"{c.laddr.ip}:{c.laddr.port}" for c in proc.net_connections("tcp") if c.raddr and c.raddr.port == port)
            except psutil.Error:
                continue
    return sum(_quiet_kill(cluster, addr) for addr in mine)


def _quiet_kill(cluster, addr: str) -> bool:
    try:
        return bool(cluster.redis.execute_command("CLIENT", "KILL", "ADDR", addr, "SKIPME", "yes"))
    except redis.RedisError:  # closed meanwhile
        return False


def test_dropped_database_and_redis_connections_are_recovered_from(cluster, api, records):
    config = tiny_config(LONG, train={"seed": 5})
    ids = [api.submit(config)["id"] for _ in range(2)]
    for job_id in ids:
        records.wait(job_id, {JobState.RUNNING, JobState.SUCCEEDED}, step=KILL_AT, logs=cluster.logs)  # a fast one may be done
    assert _terminate_database_connections(cluster.database_url) > 0
    assert _kill_redis_connections(cluster) > 0
    for job_id in ids:
        records.assert_exactly_once(job_id, config, cluster.logs)
    # Every API replica serves again by itself (its pool replaces the dropped connections).
    for replica in cluster.apis:
        wait_for(lambda replica=replica: _get(replica, cluster.token, f"/v1/jobs/{ids[0]}") == 200, 30, f"{replica.log.name} serving again", cluster.logs)


def test_a_crashed_and_restarted_redis_loses_no_job(cluster, api, records):
    """kill -9 of Redis mid-run, and back a few seconds later, empty: the queue, leases,
    heartbeats and preemption requests are gone. The reconciler re-enqueues the queued jobs
    from the database, running ones finish (or are requeued by their lease), and every job
    succeeds exactly once with an undisturbed run's losses."""
    if cluster.redis_server is None:
        pytest.skip("the cluster runs on a shared Redis (no redis-server to start one of its own): not ours to crash")
    config = tiny_config(LONG, train={"seed": 7})
    ids = [api.submit(config)["id"] for _ in range(4)]  # more than the CPUs: some wait in the queue
    wait_for(lambda: sum(records.checkpointed(j) for j in ids) >= 2, 90, "two jobs running, checkpointed", cluster.logs)
    cluster.redis_server.kill()
    time.sleep(3)  # dispatchers, attempts and API replicas see connection errors meanwhile
    cluster.redis_server.start()
    for job_id in ids:
        records.assert_exactly_once(job_id, config, cluster.logs)
    # The API replicas answer again by themselves (/readyz needs Redis and a dispatcher).
    for replica in cluster.apis:
        wait_for(lambda replica=replica: httpx.get(f"http://127.0.0.1:{replica.port}/readyz", timeout=5).status_code == 200,
                 60, f"{replica.log.name} ready again", cluster.logs)


def _get(replica, token: str, path: str) -> int:
    return httpx.get(f"http://127.0.0.1:{replica.port}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code


def test_an_api_replica_s_first_request_after_its_database_connections_drop_succeeds(cluster):
    """The API's pool has no pre-ping; a pooled connection the server ended is skipped at
    checkout all the same (service.store.db.session._skip_closed), not answered with a 503."""
    replica = cluster.apis[-1]
    assert _get(replica, cluster.token, "/v1/jobs") == 200  # a pooled connection exists
    assert _terminate_database_connections(cluster.database_url) > 0
    assert [_get(replica, cluster.token, "/v1/jobs") for _ in range(3)] == [200, 200, 200]


def _node_id(cluster, resource: str) -> str:
    """The id `unroll node list --json` gives the node that declares `resource`."""
    import json
    import subprocess

    done = subprocess.run(cluster.unroll(["node", "list", "--json"]), env=cluster.env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return next(node["id"] for node in json.loads(done.stdout) if resource in node["resources"])


def test_a_drained_node_s_jobs_checkpoint_and_move_without_using_attempts(cluster, api, records):
    """`unroll node drain NODE --wait` on a node that runs a job: the job hands back at its
    next update (not counted: max_attempts 1 would fail it otherwise), Ray places nothing
    new there, the node leaves once idle, and the job ends on another node with the losses
    of an undisturbed run."""
    import subprocess

    cluster.start_node("spare", cpus=1, gpus=0)
    cluster.wait_node("spare", joined=True)
    config = tiny_config(LONG, seed=6, max_attempts=1)
    ids = [api.submit(config)["id"] for _ in range(3)]  # a CPU each: spare and the others
    moved = wait_for(lambda: [j for j in ids if records.checkpointed(j) and running_on(cluster, records, j, 1) == "spare"],
                     90, "a job running on node spare", cluster.logs)
    drain = subprocess.run(cluster.unroll(["node", "drain", _node_id(cluster, "cluster_spare"), "--wait", "--timeout", "120"]),
                           env=cluster.env(), capture_output=True, text=True, timeout=180)
    assert drain.returncode == 0, f"{drain.stdout}\n{drain.stderr}\n{cluster.logs()}"
    assert "has left the cluster" in drain.stdout
    for job_id in ids:
        job = records.assert_exactly_once(job_id, config, cluster.logs)
        if job_id in moved:
            first, second = records.attempts(job_id)
            assert first.outcome.value == "lost" and "drained (maintenance)" in first.error, first.error
            assert second.outcome.value == "succeeded" and job.attempt == 2
            assert records.resumed(job_id) and running_on(cluster, records, job_id, 2) != "spare", records.runs(job_id)
    cluster.wait_node("spare", joined=False)  # it left by itself once idle
    cluster.nodes["spare"].kill()


def test_a_data_parallel_group_across_two_nodes_restarts_from_its_checkpoint_when_one_dies(cluster, api, records):
    """A job of two ranks (`resources.workers: 2`, a CPU each: no node here holds both, so
    the group spans two nodes); kill -9 the raylet of the node that is not the head: the
    group starts again from its checkpoint (on new processes, in the same attempt or the
    next) and ends with the losses of one undisturbed process (a group of two equals one
    process to 1e-5: tests/workers/test_ddp.py)."""
    config = tiny_config(2 * LONG, seed=7, resources={"cpus": 1, "workers": 2})
    job_id = api.submit(config)["id"]
    records.wait(job_id, {JobState.RUNNING}, step=KILL_AT, timeout=180, logs=cluster.logs)
    records.wait_checkpointed(job_id, cluster.logs)
    nodes = [cluster.node_of(pid) for pid in rank_pids(records.log_lines(job_id))[-1]]
    assert len(nodes) == 2 and len(set(nodes)) == 2 and None not in nodes, nodes
    victim = next(name for name in nodes if name != "head")
    cluster.kill_raylet(victim)
    cluster.nodes[victim].kill()
    cluster.start_node(victim, cpus=1, gpus=cluster.layout.node_gpus if victim == "gpu" else 0)  # the group needs two CPUs again
    job = records.wait(job_id, TERMINAL, timeout=240, logs=cluster.logs)
    assert job.state == JobState.SUCCEEDED, (job.error, cluster.logs())
    attempts = records.attempts(job_id)
    for earlier, later in itertools.pairwise(attempts):
        assert earlier.ended_at is not None and earlier.ended_at <= later.started_at, (earlier, later)
    groups = rank_pids(records.log_lines(job_id))
    assert len(groups) >= 2 and set(groups[-1]).isdisjoint(groups[0]), groups  # started again, on new processes
    assert records.resumed(job_id), records.runs(job_id)  # from the checkpoint, not from step 0
    reference = undisturbed_losses(config)
    got = records.losses(job_id)
    assert got.keys() == reference.keys()
    assert max(abs(got[step] - value) for step, value in reference.items()) <= 1e-5
