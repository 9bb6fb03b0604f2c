"""POST /v1/sweeps with `early_stop`: bounded (422 naming the field), stored with its
defaults, and the summary's rungs; `early_stop.advance` on trials driven in the database
as a worker would drive them (claim, metrics, finish with stopped: early)."""

from __future__ import annotations

import pytest

from service.store.db import early_stop, repo, states
from service.store.db.models import JobState
from service.store.keys import Keys
from service.store.queue import JobQueue
from tests.api.helpers import JOB, auth
from workers.dispatcher import Dispatcher

pytestmark = pytest.mark.redis

BASE = {**JOB, "train": {"max_steps": 90, "eval_every": 10}}
GOOD = {"min_steps": 10, "reduction_factor": 3}


@pytest.mark.parametrize(
    ("early", "base_train", "field"),
    [
        ({"min_steps": 15}, None, "early_stop.min_steps"),  # rung 15: no evaluation there
        ({"min_steps": 100}, None, "early_stop.min_steps"),  # past max_steps
        ({"min_steps": 10, "max_steps": 120}, None, "early_stop.max_steps"),  # past train.max_steps
        ({"min_steps": 10, "reduction_factor": 1}, None, "early_stop.reduction_factor"),
        ({"min_steps": 10, "reduction_factor": 101}, None, "early_stop.reduction_factor"),
        ({"min_steps": 0}, None, "early_stop.min_steps"),
        ({"min_steps": 10, "mode": "bohb"}, None, "early_stop.mode"),
        ({"min_steps": 10, "metric": "valid/loss"}, None, "early_stop.goal"),  # not the task's: say which way
        ({"min_steps": 10, "metric": "x" * 65}, None, "early_stop.metric"),
        ({"min_steps": 10, "surprise": 1}, None, "early_stop.surprise"),
        ({"min_steps": 10}, {"max_steps": 90, "eval_every": 0}, "base.train.eval_every"),
        ({"min_steps": 10}, {"epochs": 1, "eval_every": 10}, "early_stop.max_steps"),
        ({"min_steps": 10, "target": 1e13}, None, "early_stop.target"),
        ({"min_steps": 10, "target": "nan"}, None, "early_stop.target"),
    ],
)
async def test_early_stop_is_bounded(client, make_token, early, base_train, field):
    base = {**BASE, "train": base_train or BASE["train"]}
    r = await client.post("/v1/sweeps", json={"base": base, "grid": {"tbptt.k1": [4, 8]}, "early_stop": early}, headers=auth(make_token()))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field, r.json()


async def test_paused_trials_are_promoted_by_the_rule_and_the_summary_shows_rungs(client, make_token, db):
    token = make_token()
    body = {"base": BASE, "grid": {"tbptt.k1": [2, 4, 8]}, "early_stop": GOOD}
    r = await client.post("/v1/sweeps", json=body, headers=auth(token))
    assert r.status_code == 201, r.text
    sweep = r.json()
    assert sweep["early_stop"] == {
        "metric": "valid/accuracy", "goal": "max", "min_steps": 10, "reduction_factor": 3, "max_steps": 90,
        "mode": "asha", "resume": True, "target": None,
    }
    ids = [row["job_id"] for row in sweep["jobs"]]
    accuracy = dict(zip(ids, [0.3, 0.9, 0.5]))
    for n, job_id in enumerate(ids, start=1):
        attempt = states.claim(db, job_id, "test-worker", 60)
        repo.insert_metrics(db, job_id, attempt, [("valid/accuracy", 10, accuracy[job_id]), ("train/loss", 10, 1.0)])
        states.update_progress(db, job_id, attempt, 10)
        assert states.finish(db, job_id, attempt, JobState.SUCCEEDED, summary={"steps": 10, "stopped": "early"})
        early_stop.advance(db, job_id)
        db.commit()
        # ⌊n/3⌋ of n results at rung 10: nothing until the third, then the best (0.9).
        resumed = [i for i in ids[:n] if repo.get_job(db, i).state == JobState.QUEUED]
        assert resumed == ([ids[1]] if n == 3 else [])
    # Promoted once only; every decision names what the queue must hold (the resumed trial).
    assert [row[0] for row in early_stop.advance(db, ids[2])] == [ids[1]]
    assert [repo.get_job(db, i).state for i in ids] == [JobState.SUCCEEDED, JobState.QUEUED, JobState.SUCCEEDED]

    got = (await client.get(f"/v1/sweeps/{sweep['id']}", headers=auth(token))).json()
    rows = {row["point"]["tbptt.k1"]: row for row in got["summary"]["rows"]}
    assert [rows[k]["rung"] for k in (2, 4, 8)] == [10, 10, 10]
    assert [rows[k]["steps_used"] for k in (2, 4, 8)] == [10, 10, 10]
    assert [rows[k]["steps_saved"] for k in (2, 4, 8)] == [80, 80, 80]
    assert got["summary"]["best_point"] == {"tbptt.k1": 4}
    assert got["summary"]["rungs"] == [10, 30, 90]


async def test_without_pausing_a_trial_is_judged_once_on_arrival(client, make_token, db):
    body = {"base": BASE, "grid": {"tbptt.k1": [2, 4, 8]}, "early_stop": {**GOOD, "resume": False}}
    r = await client.post("/v1/sweeps", json=body, headers=auth(make_token()))
    assert r.status_code == 201, r.text
    ids = [row["job_id"] for row in r.json()["jobs"]]
    decisions = []
    for job_id, value in zip(ids, [0.3, 0.9, 0.5]):
        attempt = states.claim(db, job_id, "test-worker", 60)
        repo.insert_metrics(db, job_id, attempt, [("valid/accuracy", 10, value)])
        states.update_progress(db, job_id, attempt, 10)
        assert states.finish(db, job_id, attempt, JobState.SUCCEEDED, summary={"steps": 10, "stopped": "early"})
        early_stop.advance(db, job_id)
        db.commit()
        decisions.append([i for i in ids[: len(decisions) + 1] if repo.get_job(db, i).state == JobState.QUEUED and i not in sum(decisions, [])])
    # ⌈n/3⌉ of the n at rung 10, counting the newcomer: 0.3 alone goes on, 0.9 goes on,
    # 0.5 (behind 0.9) stops for good, and nothing is promoted later.
    assert decisions == [[ids[0]], [ids[1]], []]
    assert repo.get_job(db, ids[2]).state == JobState.SUCCEEDED


async def _launch_order(redis_client, settings) -> list[str]:
    queue = JobQueue(redis_client, settings.redis_prefix)
    taken = []
    while (job_id := await queue.dequeue("order-test", 60, block_s=0)) is not None:
        taken.append(job_id)
    return taken


@pytest.mark.parametrize("seed", [0, 7])
async def test_an_early_stopped_sweep_queues_its_trials_in_an_order_drawn_from_its_seed(client, make_token, settings, redis_client, seed):
    """ASHA judges the first arrivals at a rung among themselves: queued in grid order (here
    increasing k1), they would all be of one end of the grid. Shuffled by train.seed, the
    same sweep twice starts in the same order; without early_stop, in grid order."""
    token = make_token()
    grid = {"tbptt.k1": [2, 4, 8, 12, 16, 24, 32, 48]}
    base = {**BASE, "train": {**BASE["train"], "seed": seed}}
    orders = []
    for early in (GOOD, GOOD, None):
        r = await client.post("/v1/sweeps", json={"base": base, "grid": grid, "seeds": 2, "early_stop": early}, headers=auth(token))
        assert r.status_code == 201, r.text
        ids = [row["job_id"] for row in r.json()["jobs"]]  # grid order
        position = {job_id: n for n, job_id in enumerate(ids)}
        orders.append([position[job_id] for job_id in await _launch_order(redis_client, settings)])
    shuffled, again, plain = orders
    assert sorted(shuffled) == list(range(16)) and shuffled != sorted(shuffled)
    assert again == shuffled
    assert plain == list(range(16))


def _reach(db, job_id: str, step: int, accuracy: float, stopped: str = "early") -> None:
    """One attempt of a trial, as a worker drives it: claimed, evaluated at `step`, ended
    there (the decision that the worker makes in the same transaction is left out)."""
    attempt = states.claim(db, job_id, "test-worker", 60)
    repo.insert_metrics(db, job_id, attempt, [("valid/accuracy", step, accuracy)])
    states.update_progress(db, job_id, attempt, step)
    assert states.finish(db, job_id, attempt, JobState.SUCCEEDED, summary={"steps": step, "stopped": stopped})
    db.commit()


async def test_a_sweep_reads_running_until_its_rule_can_resume_nothing(client, make_token, db, settings, redis_client):
    token = make_token()
    body = {"base": BASE, "grid": {"tbptt.k1": [2, 4]}, "early_stop": GOOD}  # rungs 10, 30, 90
    r = await client.post("/v1/sweeps", json=body, headers=auth(token))
    sweep_id, ids = r.json()["id"], [row["job_id"] for row in r.json()["jobs"]]

    async def state() -> str:
        return (await client.get(f"/v1/sweeps/{sweep_id}", headers=auth(token))).json()["state"]

    # Both trials paused at rung 10 and nobody decided (the deciding process died, say):
    # every trial is finished, the sweep is not: its rule may still resume one.
    for job_id, value in zip(ids, [0.3, 0.9]):
        _reach(db, job_id, 10, value)
    assert await state() == "running"
    assert early_stop.unsettled(db) == [sweep_id]

    # The dispatcher's reconciler decides for it (no Ray needed): ⌊2/3⌋ = 0 promotions, and
    # the idle sweep resumes its best paused trial, straight into the queue.
    dispatcher = Dispatcher(settings, name="settling-test")
    try:
        await dispatcher.reconcile()
    finally:
        await dispatcher.redis.aclose()
        dispatcher.sessions.kw["bind"].dispose()
    db.expire_all()
    assert [repo.get_job(db, i).state for i in ids] == [JobState.SUCCEEDED, JobState.QUEUED]
    assert await redis_client.hexists(Keys(settings.redis_prefix).queue_members, ids[1])
    assert early_stop.unsettled(db) == [] and await state() == "running"

    # It reaches rung 30 (resumed again: the top is not reached), then the end: the rule can
    # resume nothing more, the sweep is settled and finished.
    _reach(db, ids[1], 30, 0.95)
    assert [row[0] for row in early_stop.advance(db, ids[1])] == [ids[1]]
    db.commit()
    _reach(db, ids[1], 90, 0.97, stopped="completed")
    assert early_stop.advance(db, ids[1]) == []
    db.commit()
    assert await state() == "succeeded" and early_stop.unsettled(db) == []
    assert repo.get_job(db, ids[0]).summary["stopped"] == "early"  # stopped for good at rung 10


async def test_with_a_target_the_trials_that_reached_it_leave_the_ranking(client, make_token, db):
    # "Which k1 reach 0.9?": 8 reached it before rung 10 and stopped there, done. Of the
    # open trials at rung 10 (2: 0.3, 4: 0.6) ⌊2/3⌋ = 0 are promoted, so the idle sweep
    # trains the best open one (4) on: to the top, where it ends below the target, and the
    # sweep is settled with the boundary between 4 and 8 known. Without the target, 8
    # would take rung 10's promotion and 4 would stay paused.
    token = make_token()
    body = {"base": BASE, "grid": {"tbptt.k1": [2, 4, 8]}, "early_stop": {**GOOD, "target": 0.9}}
    r = await client.post("/v1/sweeps", json=body, headers=auth(token))
    assert r.status_code == 201 and r.json()["early_stop"]["target"] == 0.9, r.text
    sweep_id, ids = r.json()["id"], [row["job_id"] for row in r.json()["jobs"]]
    _reach(db, ids[2], 10, 0.95, stopped="target")
    _reach(db, ids[0], 10, 0.3)
    _reach(db, ids[1], 10, 0.6)
    assert [row[0] for row in early_stop.advance(db, ids[1])] == [ids[1]]
    db.commit()
    _reach(db, ids[1], 30, 0.7)
    assert [row[0] for row in early_stop.advance(db, ids[1])] == [ids[1]]  # idle: the best open trial goes on
    db.commit()
    _reach(db, ids[1], 90, 0.85, stopped="completed")
    assert early_stop.advance(db, ids[1]) == []
    db.commit()
    got = (await client.get(f"/v1/sweeps/{sweep_id}", headers=auth(token))).json()
    assert got["state"] == "succeeded" and early_stop.unsettled(db) == []
    assert [repo.get_job(db, i).summary["stopped"] for i in ids] == ["early", "completed", "target"]


async def test_a_pending_reason_is_said_again_after_another_dispatcher_claimed_the_job(client, make_token, db, settings):
    """A claim clears a job's pending_reason in the database. A dispatcher that said the
    reason before the job ran elsewhere (and came back queued) must say it again, not take
    its memory for the database's: the reason is remembered per attempt number."""
    token = make_token()
    body = {"base": BASE, "grid": {"tbptt.k1": [2, 4]}, "max_parallel": 1}
    r = await client.post("/v1/sweeps", json=body, headers=auth(token))
    running, waiting = [row["job_id"] for row in r.json()["jobs"]]
    states.claim(db, running, "elsewhere", 600)  # the sweep's one slot is taken
    db.commit()
    dispatcher = Dispatcher(settings, name="reason-test")  # no Ray needed before resources are read

    async def reason() -> str | None:
        await dispatcher.place(waiting)
        db.expire_all()
        return repo.get_job(db, waiting).pending_reason

    try:
        assert await reason() == "its sweep already runs max_parallel=1 jobs"
        # Another dispatcher ran the waiting job meanwhile (its claim cleared the reason);
        # the attempt was lost and the job is queued again behind the sweep's limit.
        attempt = states.claim(db, waiting, "another", 600)
        assert repo.get_job(db, waiting).pending_reason is None
        assert states.requeue_lost(db, waiting, attempt, reason="node lost", require_expired=False)
        db.commit()
        assert await reason() == "its sweep already runs max_parallel=1 jobs"
    finally:
        await dispatcher.redis.aclose()
        dispatcher.sessions.kw["bind"].dispose()
