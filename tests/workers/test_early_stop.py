"""Early stopping of a sweep on the real stack (database, Redis queue, `unroll worker`, Ray,
trainer): trials stop at their rungs, the rule promotes the best, and a trial paused at a
rung and resumed later trains exactly the losses of a trial that never stopped."""

from __future__ import annotations

import time

from service.store import early_stop
from service.store.db import repo
from service.store.db.models import JobState
from tests.workers.test_end_to_end import tiny_config, undisturbed_losses
from trainer.config import parse_config

TERMINAL = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


def create_sweep(stack, configs: list[dict], settings: dict) -> tuple[str, list[str]]:
    """A sweep with `early_stop`, created as the API creates one (one transaction)."""
    settled = early_stop.settle(settings, [parse_config(c) for c in configs])
    with stack.sessions.begin() as session:
        sweep = repo.create_sweep(session, project_id=stack.project_id, base=configs[0], grid={}, max_parallel=1)
        sweep.early_stop = settled
        ids = []
        for config in configs:
            job, _ = repo.create_job(
                session, project_id=stack.project_id, config=config, name=None, tags=[], priority=0, max_attempts=3,
                max_steps=config["train"]["max_steps"], idempotency_key=None, sweep_id=sweep.id,
            )
            ids.append(job.id)
    for job_id in ids:
        stack.enqueue(job_id)
    return sweep.id, ids


def wait_settled(stack, ids: list[str], timeout: float = 240) -> list:
    """Until every trial is terminal, twice in a row (a promotion requeues a paused one)."""
    deadline, calm = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        jobs = [stack.job(i) for i in ids]
        calm = calm + 1 if all(j.state in TERMINAL for j in jobs) else 0
        if calm >= 3:
            return jobs
        time.sleep(0.5)
    raise AssertionError(f"sweep not settled: {[(j.state.value, j.step) for j in jobs]}\n{stack.worker_logs()}")


def test_a_paused_trial_is_promoted_later_and_resumes_bit_exactly(stack):
    # Three trials, rungs at 20 and 60 (η = 3), one at a time: the first two pause at 20 with
    # no company to compare with (⌊1/3⌋ = ⌊2/3⌋ = 0 promoted); the third's arrival makes the
    # best of the three promotable, which resumes from its checkpoint at step 20.
    configs = [tiny_config(60, tbptt={"k1": k, "k2": k}) for k in (2, 8, 4)]
    stack.start_worker()
    _, ids = create_sweep(stack, configs, {"min_steps": 20, "reduction_factor": 3, "mode": "asha", "resume": True})
    jobs = wait_settled(stack, ids)

    assert all(j.state == JobState.SUCCEEDED for j in jobs), [(j.state, j.error) for j in jobs]
    finished = [j for j in jobs if j.step == 60]
    paused = [j for j in jobs if j.step == 20]
    assert len(finished) == 1 and len(paused) == 2, [(j.step, j.summary) for j in jobs]
    assert finished[0].summary["stopped"] == "completed"
    assert all(j.summary["stopped"] == "early" for j in paused)

    with stack.sessions.begin() as session:
        at_rung = {j.id: dict(repo.read_series(session, j.id, names=["valid/accuracy"])["valid/accuracy"])[20] for j in jobs}
    assert at_rung[finished[0].id] == max(at_rung.values())  # the rule promoted the best at rung 20
    assert finished[0].attempt == 2 and all(j.attempt == 1 for j in paused)  # paused once, resumed once

    for job, config in zip(jobs, configs):
        expected = undisturbed_losses(config)
        got = stack.losses(job.id)
        assert sorted(got) == list(range(1, job.step + 1))
        assert got == {step: expected[step] for step in got}, job.id  # bit for bit, also after the pause


def test_a_trial_at_the_top_rung_below_its_max_steps_is_done_with_its_model(stack):
    # Rungs 20 and 40 of a trial that would train 60 steps: alone, it pauses at 20, the idle
    # sweep resumes it (decided in the transaction that ends the attempt), and at 40 it is
    # done: its budget in this sweep, not a pause; its model is stored like a completed
    # run's, and the sweep is settled.
    config = tiny_config(60)
    stack.start_worker()
    sweep_id, ids = create_sweep(stack, [config], {"min_steps": 20, "reduction_factor": 3, "max_steps": 40, "mode": "asha", "resume": True})
    (job,) = wait_settled(stack, ids)

    assert_done(stack, sweep_id, job, config, step=40, attempts=2, stopped="budget")


def assert_done(stack, sweep_id: str, job, config: dict, step: int, attempts: int, stopped: str) -> None:
    """Done for good at `step`: its model stored, its sweep settled, its losses undisturbed."""
    assert job.state == JobState.SUCCEEDED and job.step == step and job.attempt == attempts, (job.state, job.step, job.summary)
    assert job.summary["stopped"] == stopped and job.summary["model"]["step"] == step, job.summary
    with stack.sessions.begin() as session:
        assert repo.get_sweep(session, sweep_id, stack.project_id).settled_at is not None
    expected = undisturbed_losses(config)
    assert stack.losses(job.id) == {s: expected[s] for s in range(1, step + 1)}


def test_a_trial_that_reaches_the_target_stops_there_done_with_its_model(stack):
    # Rungs 20 and 60; the target (a validation loss at most 100) is reached by the first
    # evaluation, at step 20: the trial stops there, done rather than paused (no rule
    # resumes it), its model stored, and the sweep is settled after one attempt.
    config = tiny_config(60)
    stack.start_worker()
    settings = {"min_steps": 20, "reduction_factor": 3, "mode": "asha", "resume": True, "metric": "valid/loss", "goal": "min", "target": 100.0}
    sweep_id, ids = create_sweep(stack, [config], settings)
    (job,) = wait_settled(stack, ids)

    assert_done(stack, sweep_id, job, config, step=20, attempts=1, stopped="target")
