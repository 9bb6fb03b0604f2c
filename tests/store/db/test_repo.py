"""Repository functions: jobs, tokens, sweeps, datasets, and the fenced writes of
metrics, checkpoints and logs."""

from __future__ import annotations

import math
import random
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from service.store.db import repo, states
from service.store.db.base import utcnow
from service.store.db.errors import NotFound, StaleAttempt
from service.store.db.models import JobState

from .conftest import make_job, make_project, make_running

# --- jobs ---------------------------------------------------------------------------------


def test_ids_have_a_prefix_per_kind(session: Session) -> None:
    job = make_job(session)
    assert job.id.startswith("job_") and len(job.id) == 20
    assert job.project_id.startswith("prj_")


def test_idempotency_key_returns_the_same_job(session: Session) -> None:
    project = make_project(session)
    first, created = repo.create_job(session, project_id=project.id, config={"a": 1}, idempotency_key="k1")
    assert created
    session.commit()
    again, created = repo.create_job(session, project_id=project.id, config={"a": 2}, idempotency_key="k1")
    assert not created and again.id == first.id
    other = make_project(session, "other")
    theirs, created = repo.create_job(session, project_id=other.id, config={}, idempotency_key="k1")
    assert created and theirs.id != first.id  # keys are per project


def test_get_job_is_scoped_to_its_project(session: Session) -> None:
    job = make_job(session)
    other = make_project(session, "other")
    assert repo.get_job(session, job.id, job.project_id).id == job.id
    with pytest.raises(NotFound):
        repo.get_job(session, job.id, other.id)


def test_list_jobs_filters_and_pages(session: Session) -> None:
    jobs = [make_job(session, tags=["even" if i % 2 == 0 else "odd", "all"]) for i in range(7)]
    project_id = jobs[0].project_id
    make_job(session, project="other")
    seen, cursor = [], None
    while True:
        page, cursor = repo.list_jobs(session, project_id, limit=3, cursor=cursor)
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert seen == [j.id for j in reversed(jobs)]  # newest first, nothing twice
    even, _ = repo.list_jobs(session, project_id, tag="even")
    assert {j.id for j in even} == {j.id for j in jobs[::2]}
    states.claim(session, jobs[0].id, "w", 30)
    running, _ = repo.list_jobs(session, project_id, state=JobState.RUNNING)
    assert [j.id for j in running] == [jobs[0].id]
    assert repo.count_queued(session, project_id) == 6
    assert repo.queued_job_ids(session)[0] == jobs[1].id
    with pytest.raises(ValueError):
        repo.list_jobs(session, project_id, cursor="not a cursor")


def test_pending_reason_only_for_queued(session: Session) -> None:
    job = make_job(session)
    assert repo.set_pending_reason(session, job.id, "needs 1 GPU; no GPU node")
    assert repo.get_job(session, job.id).pending_reason == "needs 1 GPU; no GPU node"
    states.claim(session, job.id, "w", 30)
    assert repo.get_job(session, job.id).pending_reason is None  # cleared by the claim
    assert not repo.set_pending_reason(session, job.id, "late")


def test_timestamps_are_aware_utc(session: Session) -> None:
    job = make_job(session)
    session.expire_all()
    job = repo.get_job(session, job.id)
    assert job.created_at.utcoffset() == timedelta(0)


# --- tokens, sweeps, datasets -------------------------------------------------------------


def test_tokens_are_stored_hashed(session: Session) -> None:
    project = make_project(session)
    secret, row = repo.create_token(session, project.id, name="ci")
    assert row.token_hash == repo.hash_token(secret) and secret not in row.token_hash
    session.commit()
    found = repo.authenticate(session, secret)
    assert found is not None and found.project_id == project.id and found.last_used_at is not None
    assert repo.authenticate(session, secret + "x") is None
    assert repo.revoke_token(session, row.id)
    assert repo.authenticate(session, secret) is None


def test_expired_token_is_refused(session: Session) -> None:
    project = make_project(session)
    secret, _ = repo.create_token(session, project.id, expires_at=utcnow() - timedelta(seconds=1))
    assert repo.authenticate(session, secret) is None


def test_sweeps_and_datasets(session: Session) -> None:
    project = make_project(session)
    sweep = repo.create_sweep(
        session, project_id=project.id, base={"a": 1}, grid={"tbptt.k1": [8, 16]}, seeds=2, max_parallel=2
    )
    assert sweep.id.startswith("swp_")
    assert repo.sweep_state({}) == "queued"
    job = make_job(session, sweep_id=sweep.id)
    assert [j.id for j in repo.list_sweep_jobs(session, sweep.id)] == [job.id]
    assert repo.sweep_state(repo.sweep_state_counts(session, sweep.id)) == "queued"
    states.claim(session, job.id, "w", 30)
    assert repo.count_running_in_sweep(session, sweep.id) == 1
    states.finish(session, job.id, 1, JobState.FAILED)
    assert repo.sweep_state(repo.sweep_state_counts(session, sweep.id)) == "failed"
    with pytest.raises(NotFound):
        repo.get_sweep(session, sweep.id, project_id="prj_other")

    dataset = repo.create_dataset(session, project_id=project.id, name="tiny.txt", sha256="a" * 64, bytes=3, uri="f://x")
    assert dataset.id.startswith("ds_")
    assert [d.id for d in repo.list_datasets(session, project.id)] == [dataset.id]
    assert repo.get_dataset(session, dataset.id, project.id).bytes == 3


# --- metrics ------------------------------------------------------------------------------


def test_metrics_round_trip_with_nulls_for_non_finite(session: Session) -> None:
    job, attempt = make_running(session)
    points = [("train/loss", 1, 2.5), ("train/loss", 2, math.nan), ("train/loss", 3, math.inf),
              ("train/loss", 4, -math.inf), ("train/lr", 1, 0.1, 1700000000.5)]
    assert repo.insert_metrics(session, job.id, attempt, points) == 5
    session.commit()
    series = repo.read_series(session, job.id)
    assert series == {"train/loss": [(1, 2.5), (2, None), (3, None), (4, None)], "train/lr": [(1, 0.1)]}
    assert repo.metric_names(session, job.id) == ["train/loss", "train/lr"]
    assert repo.last_metrics(session, job.id) == {"train/loss": (4, None), "train/lr": (1, 0.1)}
    assert repo.read_series(session, job.id, names=["train/loss"], since_step=3) == {
        "train/loss": [(3, None), (4, None)]
    }


def test_metrics_of_a_stale_attempt_are_refused(session: Session) -> None:
    job, attempt = make_running(session)
    states.requeue_lost(session, job.id, attempt, require_expired=False)
    with pytest.raises(StaleAttempt):  # queued: no attempt may write
        repo.insert_metrics(session, job.id, attempt, [("train/loss", 1, 1.0)])
    assert states.claim(session, job.id, "w2", 30) == 2
    with pytest.raises(StaleAttempt):  # the old attempt, while the new one runs
        repo.insert_metrics(session, job.id, attempt, [("train/loss", 1, 1.0)])
    assert repo.insert_metrics(session, job.id, 2, [("train/loss", 1, 1.0)]) == 1
    assert repo.read_series(session, job.id) == {"train/loss": [(1, 1.0)]}


def test_a_resumed_attempt_overwrites_recomputed_steps(session: Session) -> None:
    job, attempt = make_running(session)
    repo.insert_metrics(session, job.id, attempt, [("loss", s, 1.0) for s in range(1, 11)])
    states.requeue_lost(session, job.id, attempt, require_expired=False)
    second = states.claim(session, job.id, "w2", 30)
    # resumed from a checkpoint at step 5: steps 6.. are recomputed
    repo.insert_metrics(session, job.id, second, [("loss", s, 2.0) for s in range(6, 13)])
    series = repo.read_series(session, job.id)["loss"]
    assert series == [(s, 1.0) for s in range(1, 6)] + [(s, 2.0) for s in range(6, 13)]
    # duplicates within one batch: the last one wins
    repo.insert_metrics(session, job.id, second, [("loss", 1, 5.0), ("loss", 1, 6.0)])
    assert repo.read_series(session, job.id)["loss"][0] == (1, 6.0)


def test_empty_batch_is_a_noop(session: Session) -> None:
    job, attempt = make_running(session)
    assert repo.insert_metrics(session, job.id, attempt, []) == 0


def test_downsampling_keeps_each_buckets_min_and_max(session: Session) -> None:
    job, attempt = make_running(session)
    rng = random.Random(0)
    values = {step: math.sin(step / 50) + rng.random() * 0.01 for step in range(1, 10_001)}
    values[4321] = 1000.0  # a spike
    values[8765] = -1000.0  # and a dip
    repo.insert_metrics(session, job.id, attempt, [("loss", s, v) for s, v in values.items()])
    session.commit()
    series = repo.read_series(session, job.id, max_points=100)["loss"]
    assert len(series) <= 100
    assert (4321, 1000.0) in series and (8765, -1000.0) in series
    assert [s for s, _ in series] == sorted({s for s, _ in series})
    assert all(values[s] == v for s, v in series)  # every point is a real point
    # each of the 50 buckets (width 200) contributes its true min and max
    for bucket in range(50):
        steps = range(1 + bucket * 200, 1 + (bucket + 1) * 200)
        low, high = min((values[s], s) for s in steps), max((values[s], s) for s in steps)
        assert (low[1], low[0]) in series and (high[1], high[0]) in series


def test_downsampling_keeps_non_finite_points_visible(session: Session) -> None:
    job, attempt = make_running(session)
    values = {step: float(step % 97) for step in range(1, 10_001)}
    for step in (777, 5000, 5001, 9999):
        values[step] = math.nan
    repo.insert_metrics(session, job.id, attempt, [("loss", s, v) for s, v in values.items()])
    series = repo.read_series(session, job.id, max_points=100)["loss"]
    assert len(series) <= 100
    nulls = [s for s, v in series if v is None]
    assert 777 in nulls and 9999 in nulls and {5000, 5001} & set(nulls)
    assert max(v for _, v in series if v is not None) == 96.0


def test_downsampling_respects_since_step(session: Session) -> None:
    job, attempt = make_running(session)
    repo.insert_metrics(session, job.id, attempt, [("loss", s, float(s)) for s in range(1, 5001)])
    series = repo.read_series(session, job.id, since_step=4001, max_points=10)["loss"]
    assert len(series) <= 10 and series[0] == (4001, 4001.0) and series[-1] == (5000, 5000.0)
    assert all(s >= 4001 for s, _ in series)
    # short series come back whole
    assert repo.read_series(session, job.id, since_step=4996, max_points=10)["loss"] == [
        (s, float(s)) for s in range(4996, 5001)
    ]
    assert repo.read_series(session, job.id, names=["nope"], max_points=10) == {"nope": []}


# --- checkpoints and logs -----------------------------------------------------------------


def test_checkpoints_are_fenced_and_replaced_per_step(session: Session) -> None:
    job, attempt = make_running(session)
    repo.add_checkpoint(session, job.id, attempt, step=100, uri="f://a", bytes=10, sha256="a" * 64)
    repo.add_checkpoint(session, job.id, attempt, step=200, uri="f://b", bytes=20, sha256="b" * 64)
    states.requeue_lost(session, job.id, attempt, require_expired=False)
    with pytest.raises(StaleAttempt):
        repo.add_checkpoint(session, job.id, attempt, step=300, uri="f://c", bytes=30, sha256="c" * 64)
    second = states.claim(session, job.id, "w2", 30)
    repo.add_checkpoint(session, job.id, second, step=200, uri="f://b2", bytes=21, sha256="d" * 64)
    assert [(c.step, c.uri, c.attempt) for c in repo.list_checkpoints(session, job.id)] == [
        (100, "f://a", 1), (200, "f://b2", 2)
    ]
    assert repo.latest_checkpoint(session, job.id).step == 200
    assert repo.get_checkpoint(session, job.id, 100).bytes == 10
    with pytest.raises(NotFound):
        repo.get_checkpoint(session, job.id, 300)


def test_logs_are_fenced_and_followable(session: Session) -> None:
    job, attempt = make_running(session)
    assert repo.append_logs(session, job.id, attempt, ["step 1", repo.LogLine("careful", "warning")]) == 2
    lines = repo.read_logs(session, job.id)
    assert [(l.line, l.level, l.attempt) for l in lines] == [("step 1", "info", 1), ("careful", "warning", 1)]
    assert repo.read_logs(session, job.id, after_id=lines[0].id)[0].line == "careful"
    states.finish(session, job.id, attempt, JobState.SUCCEEDED)
    with pytest.raises(StaleAttempt):
        repo.append_logs(session, job.id, attempt, ["too late"])
    assert repo.append_logs(session, job.id, attempt, []) == 0
