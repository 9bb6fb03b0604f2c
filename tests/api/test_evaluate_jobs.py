"""Submitting `kind: evaluate` jobs: what they name is checked in the caller's project and
the evaluated checkpoint is pinned in the config (the workers' side:
tests/workers/test_evaluate_jobs.py)."""

from __future__ import annotations

import pytest

from tests.api.helpers import auth
from tests.api.inference_helpers import text_checkpoint, trained_job

pytestmark = pytest.mark.redis


def evaluation(job_id: str, **evaluate) -> dict:
    return {"kind": "evaluate", "evaluate": {"job": job_id, **evaluate}, "data": {"kind": "text", "path": "valid.txt"}}


async def test_an_evaluation_pins_the_latest_checkpoint_of_a_job_of_the_project(client, db, settings, make_token, tmp_path):
    settings.data_roots = [tmp_path]
    (tmp_path / "valid.txt").write_text("abc\n\nabc")
    token = make_token()
    trained = await trained_job(client, db, settings, token, text_checkpoint(), step=20)
    r = await client.post("/v1/jobs", json=evaluation(trained), headers=auth(token))
    assert r.status_code == 201, r.text
    assert r.json()["config"]["evaluate"] == {"job": trained, "step": 20, "batch_size": None}
    assert r.json()["max_steps"] is None  # an evaluation makes no updates

    cases = [
        (evaluation(trained, step=7), "evaluate.step"),  # no such checkpoint
        (evaluation("job_nope"), "evaluate.job"),
        ({**evaluation(trained), "evaluate": None}, "evaluate"),
        ({**evaluation(trained), "data": {"kind": "recall"}}, "data.kind"),  # generated data: nothing to read
        (evaluation(trained, batch_size=100_000), "evaluate.batch_size"),
        (evaluation(trained, step=2**64), "evaluate.step"),  # past the database's integers
    ]
    for body, field in cases:
        r = await client.post("/v1/jobs", json=body, headers=auth(token))
        assert r.status_code == 422 and r.json()["error"]["field"] == field, (field, r.text)
    # a job of another project is not there, exactly like an unknown one
    other = await client.post("/v1/jobs", json=evaluation(trained), headers=auth(make_token("other")))
    assert other.status_code == 422 and other.json()["error"]["field"] == "evaluate.job"
    # a job that wrote no checkpoint has nothing to evaluate
    empty = await trained_job(client, db, settings, token, None)
    r = await client.post("/v1/jobs", json=evaluation(empty), headers=auth(token))
    assert r.status_code == 422 and "no checkpoint" in r.json()["error"]["message"]
