"""The inference routes keep projects apart and bounded: another project's job or session
is a 404 (exactly like an unknown one), a project's live sessions are bounded
(UNROLL_MAX_SESSIONS_PER_PROJECT, 429), and generate's bounds are 422s naming the field."""

from __future__ import annotations

import pytest

from tests.api.helpers import auth
from tests.api.inference_helpers import text_checkpoint, trained_job
from trainer.inference import MAX_PROMPT_CHARS, MAX_TOKENS


@pytest.fixture
def settings(settings):  # the API tests' settings, with a small session bound
    return settings.model_copy(update={"max_sessions_per_project": 3})


async def test_another_projects_job_and_session_are_404(client, db, settings, make_token):
    mine, theirs = make_token("mine"), make_token("theirs")
    job_id = await trained_job(client, db, settings, mine, text_checkpoint())
    sid = (await client.post(f"/v1/jobs/{job_id}/sessions", headers=auth(mine))).json()["id"]
    for path, body in (("generate", {"prompt": "a"}), ("predict", {"series": [[1.0]]}), ("sessions", None)):
        r = await client.post(f"/v1/jobs/{job_id}/{path}", json=body, headers=auth(theirs))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
        unknown = await client.post(f"/v1/jobs/job_0000000000000000/{path}", json=body, headers=auth(theirs))
        assert unknown.status_code == 404 and unknown.json()["error"]["message"].replace("job_0000000000000000", job_id) == r.json()["error"]["message"]
    r = await client.post(f"/v1/sessions/{sid}/step", json={"inputs": "a"}, headers=auth(theirs))
    assert r.status_code == 404, r.text
    assert (await client.delete(f"/v1/sessions/{sid}", headers=auth(theirs))).status_code == 404
    # untouched: still the owner's
    r = await client.post(f"/v1/sessions/{sid}/step", json={"inputs": "a"}, headers=auth(mine))
    assert r.status_code == 200, r.text
    for method, path in (("POST", f"/v1/jobs/{job_id}/generate"), ("POST", f"/v1/sessions/{sid}/step"), ("DELETE", f"/v1/sessions/{sid}")):
        assert (await client.request(method, path, json={"prompt": "a", "inputs": "a"})).status_code == 401


async def test_sessions_past_the_projects_bound_are_429_and_a_deleted_one_frees_its_slot(client, db, settings, make_token):
    mine, theirs = make_token("mine"), make_token("theirs")
    job_id = await trained_job(client, db, settings, mine, text_checkpoint())
    other_job = await trained_job(client, db, settings, theirs, text_checkpoint())
    ids = []
    for _ in range(3):
        r = await client.post(f"/v1/jobs/{job_id}/sessions", headers=auth(mine))
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    r = await client.post(f"/v1/jobs/{job_id}/sessions", headers=auth(mine))
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_sessions", r.text
    assert "UNROLL_MAX_SESSIONS_PER_PROJECT" in r.json()["error"]["message"]
    # another project is not held back by this one's sessions
    assert (await client.post(f"/v1/jobs/{other_job}/sessions", headers=auth(theirs))).status_code == 201
    assert (await client.delete(f"/v1/sessions/{ids[0]}", headers=auth(mine))).status_code == 204
    assert (await client.post(f"/v1/jobs/{job_id}/sessions", headers=auth(mine))).status_code == 201


async def test_generate_bounds_are_422_naming_the_field(client, db, settings, make_token):
    token = make_token()
    job_id = await trained_job(client, db, settings, token, text_checkpoint())
    for body, field in (
        ({"prompt": "a", "max_tokens": MAX_TOKENS + 1}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "a", "temperature": -1}, "temperature"),
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "extra": 1}, "extra"),
    ):
        r = await client.post(f"/v1/jobs/{job_id}/generate", json=body, headers=auth(token))
        assert r.status_code == 422 and r.json()["error"]["field"] == field, (body, r.text)
    assert MAX_PROMPT_CHARS > settings.max_body_bytes  # a prompt past its bound is past the body's: 413
    r = await client.post(f"/v1/jobs/{job_id}/generate", json={"prompt": "a" * settings.max_body_bytes}, headers=auth(token))
    assert r.status_code == 413
