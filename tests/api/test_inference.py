"""The inference routes (service/api/routes/inference.py) on a real trained model: generate
over Server-Sent Events is trainer.load(...).generate; predict is trainer's predict; an
inference session fed a text in pieces gives what one step over the whole text gives, and
its state outlives the API process (it is in Redis)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from service.api.app import create_app
from tests.api.helpers import auth
from tests.api.inference_helpers import events, series_checkpoint, text_checkpoint, trained_job, without_inference
from tests.trainer.usage import series_rows
from trainer import checkpoint as ckpt
from trainer.artifact import read
from trainer.inference import MAX_TOKENS, Model

TEXT = "the cat sat on a mat\nthe dog ran far away\na cat ran on the mat\n" * 3


def local_model(blob: bytes) -> Model:
    return Model(read(ckpt.from_bytes(blob)))


async def test_generate_streams_what_the_trainer_generates_with_the_same_seed(client, db, settings, make_token):
    token = make_token()
    job_id = await trained_job(client, db, settings, token, text_checkpoint())
    body = {"prompt": "the cat ß", "max_tokens": 40, "temperature": 0.8, "top_k": 5, "seed": 7}
    r = await client.post(f"/v1/jobs/{job_id}/generate", json=body, headers=auth(token))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    got = events(r.text)
    tokens = [e for e in got if e["type"] == "token"]
    done = got[-1]
    assert done["type"] == "done" and done["tokens"] == len(tokens) == 40 and done["step"] == 20
    expected = local_model(text_checkpoint()).generate("the cat ß", 40, 0.8, 5, 7)
    assert "".join(e["text"] for e in tokens) == expected.text
    assert done["unknown"] == expected.unknown == ["ß"]
    # the model was loaded once, and reused
    r = await client.post(f"/v1/jobs/{job_id}/generate", json=body, headers=auth(token))
    assert "".join(e["text"] for e in events(r.text) if e["type"] == "token") == expected.text
    assert client._transport.app.state.runtime.models.loads == 1


async def test_generate_bounds_and_kinds(client, db, settings, make_token):
    token = make_token()
    job_id = await trained_job(client, db, settings, token, text_checkpoint())
    r = await client.post(f"/v1/jobs/{job_id}/generate", json={"prompt": "a", "max_tokens": MAX_TOKENS + 1}, headers=auth(token))
    assert r.status_code == 422 and r.json()["error"]["field"] == "max_tokens", r.text
    r = await client.post(f"/v1/jobs/{job_id}/generate", json={"prompt": "a", "top_k": 10_000}, headers=auth(token))
    assert r.status_code == 422 and r.json()["error"]["field"] == "top_k", r.text  # past the vocabulary: the trainer says so
    series = await trained_job(client, db, settings, token, series_checkpoint())
    r = await client.post(f"/v1/jobs/{series}/generate", json={"prompt": "a"}, headers=auth(token))
    assert r.status_code == 409 and r.json()["error"]["code"] == "wrong_kind" and "timeseries" in r.json()["error"]["message"]


async def test_predict_is_the_trainers_forecast(client, db, settings, make_token):
    token = make_token()
    job_id = await trained_job(client, db, settings, token, series_checkpoint())
    rows = series_rows(60, seed=9)
    series = {"load": [r["load"] for r in rows[:50]], "temp": [r["temp"] for r in rows[:50]]}
    future = {"temp": [r["temp"] for r in rows[50:53]]}
    r = await client.post(f"/v1/jobs/{job_id}/predict", json={"series": series, "horizon": 4, "future": future}, headers=auth(token))
    assert r.status_code == 200, r.text
    expected = local_model(series_checkpoint()).predict(series, 4, future)
    assert r.json()["forecast"] == pytest.approx(expected, rel=1e-6) and r.json()["target"] == "load"
    r = await client.post(f"/v1/jobs/{job_id}/predict", json={"series": series, "horizon": 4}, headers=auth(token))
    assert r.status_code == 422 and r.json()["error"]["field"] == "future", r.text
    r = await client.post(f"/v1/jobs/{job_id}/predict", json={"series": [[1.0, 2.0, 3.0]]}, headers=auth(token))
    assert r.status_code == 422 and r.json()["error"]["field"] == "series", r.text


async def test_the_validation_forecast_is_the_models_over_the_jobs_own_split(client, db, settings, make_token):
    """GET /v1/jobs/{id}/forecast (the job page's forecast plot): one-step-ahead forecasts
    over the validation split of the job's data file, read only inside the data roots."""
    from pathlib import Path

    token = make_token()
    job_id = await trained_job(client, db, settings, token, series_checkpoint())
    model = local_model(series_checkpoint())
    data_file = Path(model.config.data.path)
    settings.data_roots = [data_file.parent]
    r = await client.get(f"/v1/jobs/{job_id}/forecast", params={"rows": 40}, headers=auth(token))
    assert r.status_code == 200, r.text
    drawn = r.json()
    rows = series_rows(400, seed=5)  # the file series_config wrote
    start = int(400 * (1 - model.config.data.valid_fraction))
    assert drawn["first_row"] == start + 1 and drawn["target"] == "load"
    assert drawn["actual"] == pytest.approx([row["load"] for row in rows[start + 1 : start + 41]], rel=1e-6)
    inputs = [[row["load"], row["temp"]] for row in rows[start : start + 40]]
    assert drawn["forecast"] == pytest.approx(model.step(inputs)[0].tolist(), rel=1e-5)
    assert (await client.get(f"/v1/jobs/{job_id}/forecast", params={"rows": 10**6}, headers=auth(token))).status_code == 422

    settings.data_roots = [data_file.parent / "elsewhere"]  # the file is no longer one the service may read
    r = await client.get(f"/v1/jobs/{job_id}/forecast", headers=auth(token))
    assert r.status_code == 409 and "data roots" in r.json()["error"]["message"]
    text_job = await trained_job(client, db, settings, token, text_checkpoint())
    assert (await client.get(f"/v1/jobs/{text_job}/forecast", headers=auth(token))).status_code == 409


async def test_a_session_fed_in_50_chunks_equals_one_step_over_the_whole_text(client, db, settings, make_token):
    token = make_token()
    job_id = await trained_job(client, db, settings, token, text_checkpoint())

    async def session() -> str:
        r = await client.post(f"/v1/jobs/{job_id}/sessions", headers=auth(token))
        assert r.status_code == 201, r.text
        assert r.json()["kind"] == "text" and r.json()["step"] == 20
        return r.json()["id"]

    whole, pieces = await session(), await session()
    r = await client.post(f"/v1/sessions/{whole}/step", json={"inputs": TEXT, "outputs": "all"}, headers=auth(token))
    assert r.status_code == 200, r.text
    at_once = r.json()["outputs"]
    assert len(at_once) == len(TEXT)
    cuts = [len(TEXT) * i // 50 for i in range(51)]
    chunks = [TEXT[a:b] for a, b in zip(cuts, cuts[1:])]
    assert len(chunks) == 50
    stepped = []
    for chunk in chunks:
        r = await client.post(f"/v1/sessions/{pieces}/step", json={"inputs": chunk, "outputs": "all"}, headers=auth(token))
        assert r.status_code == 200, r.text
        stepped.extend(r.json()["outputs"])
    assert torch.allclose(torch.tensor(stepped), torch.tensor(at_once), atol=1e-5)
    # and it is the trainer's step over the whole text
    model = local_model(text_checkpoint())
    ids, _ = model.encode(TEXT)
    out, _ = model.step(ids)
    assert torch.allclose(torch.tensor(at_once), out, atol=1e-5)
    assert r.json()["next"]["token"] in model.vocab

    assert (await client.delete(f"/v1/sessions/{pieces}", headers=auth(token))).status_code == 204
    r = await client.post(f"/v1/sessions/{pieces}/step", json={"inputs": "a"}, headers=auth(token))
    assert r.status_code == 404
    assert (await client.delete(f"/v1/sessions/{pieces}", headers=auth(token))).status_code == 404


async def test_concurrent_steps_of_one_session_do_not_interleave(client, db, settings, make_token):
    token = make_token()
    job_id = await trained_job(client, db, settings, token, text_checkpoint())
    sid = (await client.post(f"/v1/jobs/{job_id}/sessions", headers=auth(token))).json()["id"]
    answers = await asyncio.gather(*(
        client.post(f"/v1/sessions/{sid}/step", json={"inputs": "ab" * 200}, headers=auth(token)) for _ in range(8)
    ))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    # eight steps of 400 tokens each, one after the other, whatever their order
    model = local_model(text_checkpoint())
    ids, _ = model.encode("ab" * 200 * 8)
    out, _ = model.step(ids)
    final = (await client.post(f"/v1/sessions/{sid}/step", json={"inputs": "a"}, headers=auth(token))).json()["outputs"][-1]
    expected, _ = model.step(ids + ids[:1])
    assert torch.allclose(torch.tensor(final), expected[-1], atol=1e-5)


async def test_a_sessions_state_survives_an_api_restart(client, db, settings, make_token):
    token = make_token()
    job_id = await trained_job(client, db, settings, token, text_checkpoint())
    sid = (await client.post(f"/v1/jobs/{job_id}/sessions", headers=auth(token))).json()["id"]
    half = len(TEXT) // 2
    r = await client.post(f"/v1/sessions/{sid}/step", json={"inputs": TEXT[:half]}, headers=auth(token))
    assert r.status_code == 200, r.text

    other = create_app(settings)  # a new API process: its own (empty) model cache, the same Redis
    async with other.router.lifespan_context(other):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other), base_url="http://unroll.test") as fresh:
            r = await fresh.post(f"/v1/sessions/{sid}/step", json={"inputs": TEXT[half:], "outputs": "all"}, headers=auth(token))
            assert r.status_code == 200, r.text
            assert other.state.runtime.models.loads == 1
    model = local_model(text_checkpoint())
    out, _ = model.step(model.encode(TEXT)[0])
    assert torch.allclose(torch.tensor(r.json()["outputs"]), out[half:], atol=1e-5)


async def test_a_job_without_a_usable_checkpoint_is_a_409(client, db, settings, make_token):
    token = make_token()
    bare = await trained_job(client, db, settings, token, None)
    old = await trained_job(client, db, settings, token, without_inference(text_checkpoint()))
    for path, body in (("generate", {"prompt": "a"}), ("predict", {"series": [[1.0]]}), ("sessions", None)):
        r = await client.post(f"/v1/jobs/{bare}/{path}", json=body, headers=auth(token))
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_checkpoint", r.text
        r = await client.post(f"/v1/jobs/{old}/{path}", json=body, headers=auth(token))
        assert r.status_code == 409 and r.json()["error"]["code"] == "not_usable", r.text
        assert "no inference section" in r.json()["error"]["message"]


async def test_step_inputs_are_checked(client, db, settings, make_token):
    token = make_token()
    job_id = await trained_job(client, db, settings, token, text_checkpoint())
    sid = (await client.post(f"/v1/jobs/{job_id}/sessions", headers=auth(token))).json()["id"]
    for inputs in ([10_000], [[1.5, "x"]], "", [[]], [[], []]):  # [[]]: steps of no streams (was a 500)
        r = await client.post(f"/v1/sessions/{sid}/step", json={"inputs": inputs}, headers=auth(token))
        assert r.status_code == 422 and r.json()["error"]["field"] == "inputs", r.text
    r = await client.post(f"/v1/sessions/{sid}/step", json={"inputs": [1, 2, 3]}, headers=auth(token))  # token ids
    assert r.status_code == 200 and r.json()["steps"] == 3 and len(r.json()["outputs"]) == 1


async def test_the_cli_and_the_client_use_a_job_by_its_id(live_server, db, settings, make_token, tmp_path, monkeypatch, capsys):
    from service.cli.client import Client
    from service.cli.main import main

    token = make_token()
    async with httpx.AsyncClient(base_url=live_server.url, timeout=30) as http:
        job_id = await trained_job(http, db, settings, token, text_checkpoint())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNROLL_URL", live_server.url)
    monkeypatch.setenv("UNROLL_TOKEN", token)
    expected = local_model(text_checkpoint()).generate("the ", 30, 1.0, None, 5).text
    code = await asyncio.to_thread(main, ["generate", job_id, "--prompt", "the ", "-n", "30", "--seed", "5"])
    assert code == 0
    assert capsys.readouterr().out == "the " + expected + "\n"
    assert (tmp_path / ".unroll" / "models" / job_id / "20.pt").read_bytes() == text_checkpoint()
    with Client(live_server.url, token) as api:
        model = await asyncio.to_thread(api.load, job_id)
    assert model.generate("the ", 30, seed=5).text == expected
    code = await asyncio.to_thread(main, ["generate", "job_unknown", "--prompt", "a"])
    assert code == 2 and "job_unknown" in capsys.readouterr().err


def test_a_forecast_of_a_data_file_that_changed_is_a_409_not_a_500(tmp_path):
    """The job's data file may be emptied or replaced after training: the page says so."""
    from service.api import forecast

    model = local_model(series_checkpoint())
    for name, content in (("empty.csv", b""), ("binary.csv", b"\xff\xfe\x00load\x00"), ("words.csv", b"load,temp\nx,y\n1,2\n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(forecast.Unavailable):
            forecast.validation_forecast(model, tmp_path / name, 0.5, 10)
