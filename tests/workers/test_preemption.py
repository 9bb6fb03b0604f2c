"""Preemption: the policy (which running attempts make room, and which never), and on the
real stack (database, Redis queue, `unroll worker`, Ray with 2 CPUs, trainer) a job of
higher priority takes a full cluster's slot while the preempted job loses nothing."""

from __future__ import annotations

import json
import time

import redis

from service.store.db import repo, states
from service.store.db.models import JobState
from service.store.keys import Keys
from tests.workers.test_end_to_end import tiny_config, undisturbed_losses
from workers.placement import Needs
from workers.dispatcher import Running
from workers.preemption import Candidate, Preemptor, choose

TERMINAL = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
ONE = Needs(1.0, 0.0)


def run(job_id: str, priority: int = 0, ran_s: float = 100.0, cpus: float = 1.0, **kw) -> Candidate:
    return Candidate(job_id, 1, priority, kw.pop("preemptible", True), ran_s, cpus, 0.0, **kw)


def test_only_lower_priority_preemptible_jobs_that_ran_long_enough_are_chosen():
    running = [
        run("same", priority=5),
        run("young", priority=0, ran_s=10),
        run("pinned", priority=0, preemptible=False),
        run("low", priority=1),
    ]
    assert [c.job_id for c in choose("w", 5, ONE, {}, running, min_run_s=60)] == ["low"]
    assert choose("w", 1, ONE, {}, running, min_run_s=60) == []  # strictly lower only
    assert [c.job_id for c in choose("w", 5, ONE, {}, running, min_run_s=0)] == ["young"]  # lowest priority first


def test_only_as_many_as_needed_and_none_if_they_would_not_suffice():
    running = [run("a", priority=0, ran_s=100), run("b", priority=0, ran_s=200), run("c", priority=1)]
    two = Needs(2.0, 0.0)
    assert [c.job_id for c in choose("w", 5, two, {"CPU": 0.0}, running, 60)] == ["a", "b"]  # youngest first
    assert [c.job_id for c in choose("w", 5, two, {"CPU": 1.0}, running, 60)] == ["a"]
    assert choose("w", 5, Needs(4.0, 0.0), {"CPU": 0.0}, running, 60) == []  # 3 CPUs at most
    assert choose("w", 5, Needs(1.0, 1.0), {"CPU": 0.0}, running, 60) == []  # none holds a GPU


def test_what_is_already_stopping_counts_and_nobody_is_preempted_twice_in_a_row_for_one_job():
    stopping = [run("a", stopping=True), run("b")]
    assert choose("w", 5, ONE, {}, stopping, 60) == []  # a's CPU is on its way back
    again = [run("a", last_preempted_for="w"), run("b", priority=2)]
    assert [c.job_id for c in choose("w", 5, ONE, {}, again, 60)] == ["b"]
    assert [c.job_id for c in choose("x", 5, ONE, {}, again, 60)] == ["a"]  # another waiting job may


def test_a_try_that_chose_nobody_is_not_repeated_until_something_changes():
    preemptor = Preemptor(Keys("t"), min_run_s=60)
    low = Running("low", 1, ref=None, needs=Needs(2.0, 0.0), started=time.monotonic() - 100, priority=0)
    depth = {5: 1}  # one queued job of priority 5
    assert preemptor.worth_trying([low], depth)
    assert [v.job_id for v in preemptor.choose_for("w", 5, Needs(2.0, 0.0), {"CPU": 0.0}, [low], depth)] == ["low"]
    assert preemptor.preempted_for == {"low": "w"}

    # "low" handed back and runs again; "w" waits on: "low" is not preempted twice in a row
    # for it, so the try is futile, and so is the same try again (the dispatcher waits for
    # capacity instead of taking the message at once)...
    again = Running("low", 2, ref=None, needs=Needs(2.0, 0.0), started=time.monotonic() - 100, priority=0)
    assert preemptor.choose_for("w", 5, Needs(2.0, 0.0), {"CPU": 0.0}, [again], depth) == []
    assert not preemptor.worth_trying([again], depth)
    # ...until the queue (a new arrival) or what runs changes.
    assert preemptor.worth_trying([again], {5: 1, 9: 1})
    assert preemptor.worth_trying([], depth) is False  # nothing to preempt at all
    # What is remembered goes when either side starts or ends for good.
    preemptor.started("w")
    assert preemptor.preempted_for == {}
    preemptor.preempted_for["low"] = "x"
    preemptor.ended("low")
    assert preemptor.preempted_for == {}


def test_a_preempted_job_hands_back_its_slot_and_resumes_with_identical_losses(stack):
    # The low-priority job holds both CPUs; it may not count the preemption as an attempt
    # (max_attempts 1: a counted one would fail it).
    # Long enough (a few seconds) that it is still training when the high one comes: its
    # progress reaches the database once a second, and 200 updates take less here.
    low = tiny_config(2000, train={"max_steps": 2000, "eval_every": 1000, "checkpoint_every": 100, "seed": 3, "device": "cpu"}, resources={"cpus": 2})
    low["max_attempts"] = 1
    high = tiny_config(10, resources={"cpus": 1})
    stack.start_worker(UNROLL_MIN_RUN_S="0")
    low_id = stack.submit(low, priority=0)
    stack.wait(low_id, {JobState.RUNNING}, step=20)
    high_id = stack.submit(high, priority=5)
    high_job = stack.wait(high_id, TERMINAL)
    low_job = stack.wait(low_id, TERMINAL, timeout=180)

    assert high_job.state == JobState.SUCCEEDED, (high_job.error, stack.worker_logs())
    assert low_job.state == JobState.SUCCEEDED, (low_job.error, stack.worker_logs())
    assert low_job.step == 2000 and low_job.attempt == 2
    with stack.sessions.begin() as session:
        first, second = states.list_attempts(session, low_id)
        (high_attempt,) = states.list_attempts(session, high_id)
        lines = [log.line for log in repo.read_logs(session, low_id)]
    assert first.outcome.value == "lost" and f"preempted by job {high_id}" in first.error
    assert second.outcome.value == "succeeded"
    assert any(f"preempted by job {high_id}" in line for line in lines)
    # Measured, not asserted: from the hand-back to the waiting job's start.
    print(f"\nhigh-priority job: started {(high_attempt.started_at - first.ended_at).total_seconds():.3f} s after the hand-back,"
          f" {(high_attempt.started_at - high_job.created_at).total_seconds():.3f} s after its submission")
    assert high_attempt.started_at >= first.ended_at  # it started once the slot was free

    expected = undisturbed_losses(low)
    got = stack.losses(low_id)
    assert sorted(got) == list(range(1, 2001)) and got == expected  # bit for bit across the preemption

    # The counter, as the dispatcher's next heartbeat publishes it (every few seconds).
    beat = redis.Redis.from_url(stack.redis_url)
    try:
        deadline, samples = time.monotonic() + 30, {}
        while samples.get("unroll_preemptions_total") != 1 and time.monotonic() < deadline:
            time.sleep(0.5)
            keys = list(beat.scan_iter(match=Keys(stack.prefix).dispatcher_heartbeats))
            snapshot = json.loads(beat.get(keys[0]))["metrics"]
            samples = {s[0]: s[2] for family in snapshot for s in family["samples"]}
    finally:
        beat.close()
    assert samples["unroll_preemptions_total"] == 1


def test_only_attempts_that_can_hand_back_are_preemptible():
    """A data-parallel group or an evaluation never reads the request: choosing one would
    make the waiting job wait for its end."""
    from workers.preemption import preemptible

    assert preemptible({"data": {"kind": "recall"}})
    assert not preemptible({"preemptible": False})
    assert not preemptible({"resources": {"workers": 2}})
    assert not preemptible({"kind": "evaluate", "evaluate": {"job": "job_x"}})


def test_a_drained_node_s_attempt_hands_back_uncounted_and_resumes_with_identical_losses(stack):
    """The drain mark `unroll node drain` sets (Keys.node_drain, on the node the attempt's
    start line names): the attempt checkpoints and hands back like a preemption, without
    spending max_attempts; once the node is usable again (here: the mark removed; in a
    cluster: another node, tests/cluster) it resumes bit for bit."""
    import re

    config = tiny_config(2000, train={"max_steps": 2000, "eval_every": 1000, "checkpoint_every": 100, "seed": 5, "device": "cpu"})
    config["max_attempts"] = 1
    nodes = [n["id"] for n in _nodes(stack)]  # asked first: it takes seconds, the job not many more
    stack.start_worker()
    job_id = stack.submit(config)
    stack.wait(job_id, {JobState.RUNNING}, step=20)
    with stack.sessions.begin() as session:
        start = next(log.line for log in repo.read_logs(session, job_id) if log.line.startswith("attempt 1 on "))
    node = re.search(r", node ([0-9a-f]{12})", start)
    assert node, start
    client = redis.Redis.from_url(stack.redis_url)
    keys = Keys(stack.prefix)
    try:
        full = next(n for n in nodes if n.startswith(node.group(1)))
        client.set(keys.node_drain(full), json.dumps({"node": node.group(1), "reason": "kernel upgrade", "at": time.time()}), ex=60)
        deadline = time.monotonic() + 60
        while stack.job(job_id).attempt < 2 and time.monotonic() < deadline:  # handed back, and claimed again
            time.sleep(0.1)
        client.delete(keys.node_drain(full))
    finally:
        client.close()
    job = stack.wait(job_id, TERMINAL, timeout=180)
    assert job.state == JobState.SUCCEEDED, (job.error, stack.worker_logs())
    with stack.sessions.begin() as session:
        first, *later = states.list_attempts(session, job_id)
        lines = [log.line for log in repo.read_logs(session, job_id)]
    assert first.outcome.value == "lost" and f"node {node.group(1)} drained (kernel upgrade)" in first.error, first.error
    assert later[-1].outcome.value == "succeeded"  # max_attempts 1: the drain was not counted
    assert any("drained (kernel upgrade): handed back at step" in line for line in lines)
    got = stack.losses(job_id)
    assert sorted(got) == list(range(1, 2001)) and got == undisturbed_losses(config)


def _nodes(stack) -> list[dict]:
    """`unroll node list --json`: the cluster's alive nodes."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "service.cli", "node", "list", "--json"], env=stack.env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
