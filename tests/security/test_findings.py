"""Findings of issue 14, one test each: every one of them failed on the code before its fix
(c069bd3): the request was a 201 (or a 500), or the checkpoint ran its code."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import httpx
import pytest
import torch

from tests.api.helpers import JOB, auth, job
from trainer import checkpoint as ckpt
from trainer.config import ConfigError, parse_config


# --- non-finite numbers: a 422 naming the field, never a 500 (PostgreSQL's JSONB refuses them)


@pytest.mark.parametrize(("path", "literal"), [
    ("resources.gpus", "1e999"),
    ("clip.max_norm", "1e999"),
    ("optim.weight_decay", "-1e999"),
    ("data.batch_size", "1e999"),
])
async def test_a_non_finite_number_in_a_job_is_a_422_naming_it(client, make_token, path, literal):
    # 1e999 is valid JSON that reads as infinity. (NaN and Infinity are not JSON: the
    # submission refuses them as such, a 400.)
    body = json.dumps(job(**{path.replace(".", "__"): "HERE"})).replace('"HERE"', literal)
    response = await client.post("/v1/jobs", content=body, headers={**auth(make_token()), "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == path


async def test_a_non_finite_number_in_a_sweep_is_a_422_even_where_the_grid_overrides_it(client, make_token):
    token = make_token()
    # The base's value is replaced at every point, so each job is valid; the base itself is
    # stored as sent.
    base = job(tbptt__k1=4, tbptt__k2="HERE")
    body = json.dumps({"base": base, "grid": {"tbptt.k1": [4, 8], "tbptt.k2": [4, 8]}}).replace('"HERE"', "Infinity")
    response = await client.post("/v1/sweeps", content=body, headers={**auth(token), "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "base" and "base.tbptt.k2" in response.json()["error"]["message"]
    body = json.dumps({"base": JOB, "grid": {"clip.max_norm": [1.0]}}).replace("[1.0]", "[1.0, NaN]")
    response = await client.post("/v1/sweeps", content=body, headers={**auth(token), "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "grid"
    assert (await client.get("/v1/sweeps/nothing", headers=auth(token))).status_code == 404  # the API still answers


# --- train.device: cuda without a reserved GPU ------------------------------------------


def test_device_cuda_needs_a_gpu_reserved():
    config = {**JOB, "train": {**JOB["train"], "device": "cuda"}}
    with pytest.raises(ConfigError) as raised:
        parse_config(config)
    assert raised.value.first_field == "train.device"
    parse_config({**config, "resources": {"gpus": 1}})  # with one reserved it is fine


async def test_device_cuda_without_gpus_is_a_422(client, make_token):
    response = await client.post("/v1/jobs", json=job(train__device="cuda"), headers=auth(make_token()))
    assert response.status_code == 422 and response.json()["error"]["field"] == "train.device", response.text


# --- checkpoints are data, never code ---------------------------------------------------


class _RunsCode:
    """What an attacker who can write the artifact store would put in a checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_that_carries_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save({"format": ckpt.FORMAT, "model": {}, "payload": _RunsCode(str(marker))}, buffer)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.from_bytes(buffer.getvalue())
    assert not marker.exists()


def test_a_real_checkpoint_still_loads(tmp_path):
    from trainer.loop import Callback, fit

    saved = {}

    class Keep(Callback):
        def on_checkpoint(self, step, state):
            saved[step] = ckpt.to_bytes(state)

    config = {**JOB, "train": {"max_steps": 4, "checkpoint_every": 2, "eval_every": 0, "device": "cpu"}}
    fit(config, [Keep()])
    state = ckpt.from_bytes(saved[4])
    assert state["step"] == 4 and state["format"] == ckpt.FORMAT
    resumed = fit({**config, "train": {**config["train"], "max_steps": 6}}, resume=ckpt.from_bytes(saved[2]))
    assert resumed.steps == 6


async def test_the_max_norm_the_one_infinite_value_is_stored_and_read_back(client, make_token):
    token = make_token()
    response = await client.post("/v1/jobs", json=job(clip={"mode": "norm", "norm_type": "inf"}), headers=auth(token))
    assert response.status_code == 201, response.text
    stored = (await client.get(f"/v1/jobs/{response.json()['id']}", headers=auth(token))).json()["config"]
    assert stored["clip"]["norm_type"] == "Infinity"
    assert parse_config(stored).clip.norm_type == float("inf")


# --- /readyz tells anonymous callers only which dependency is down ------------------------


async def test_readyz_says_which_dependency_is_down_and_only_the_admin_why(settings):
    from service.api.app import create_app
    from tests.api.helpers import ADMIN_TOKEN

    db_down = settings.model_copy(update={"database_url": "postgresql://nobody@127.0.0.1:1/secret_db_name"})
    app = create_app(db_down)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            anonymous = await http.get("/readyz")
            assert anonymous.status_code == 503
            assert anonymous.json()["checks"]["database"] == "down", anonymous.text  # no driver, host or error text
            admin = await http.get("/readyz", headers=auth(ADMIN_TOKEN))
            assert admin.json()["checks"]["database"].startswith("down: ")  # the operator sees why


# --- dataset names that are folders -------------------------------------------------------


@pytest.mark.parametrize("name", [".", "..", "..."])
async def test_a_dataset_named_like_a_folder_is_a_422(client, make_token, settings, name):
    token = make_token()
    response = await client.post("/v1/datasets", params={"name": name}, content=b"abc", headers=auth(token))
    assert response.status_code == 422 and response.json()["error"]["field"] == "name", response.text
    stored = [p for p in Path(settings.artifacts).rglob("*") if p.is_file()]
    assert stored == []  # nothing written, one level up or anywhere


def test_the_artifact_store_never_names_a_folder(tmp_path):
    from service.store.artifacts import ArtifactStore

    store = ArtifactStore(str(tmp_path))
    for name in (".", "..", "a/..", ""):
        assert store.dataset_uri("ds_1", name).endswith("/datasets/ds_1/data")


async def test_a_nul_character_in_a_sweep_is_a_422(client, make_token):
    # The base is stored as sent, so a NUL the grid overrides at every point still reaches
    # the database, which cannot hold it.
    body = {"base": job(name="a\x00b"), "grid": {"name": ["x", "y"]}}
    response = await client.post("/v1/sweeps", json=body, headers=auth(make_token()))
    assert response.status_code == 422 and response.json()["error"]["field"] == "base", response.text
    assert "base.name" in response.json()["error"]["message"]


# --- bounds on every field (service.store.limits) ----------------------------------------


@pytest.mark.parametrize(("overrides", "field"), [
    # Issue 14 measured this one as a 201 (a tiny hidden size keeps it under the parameter cap).
    ({"model": {"cell": "rnn_tanh", "hidden_size": 1, "num_layers": 12_000_000}}, "model.num_layers"),
    ({"resources": {"cpus": 5e-324}}, "resources.cpus"),  # overflowed the dispatcher's arithmetic
    ({"resources": {"cpus": 0.0001}}, "resources.cpus"),  # 10,000 jobs per CPU
    ({"max_attempts": 100}, "max_attempts"),  # a crashing job retried 100 times
    ({"data": {"kind": "recall", "length": 200, "batch_size": 1_000_000}}, "data.batch_size"),
    ({"tbptt": {"k1": 10_000_000}}, "tbptt.k1"),
])
async def test_a_field_past_its_limit_is_a_422_naming_it(client, make_token, overrides, field):
    response = await client.post("/v1/jobs", json={**JOB, **overrides}, headers=auth(make_token()))
    assert response.status_code == 422 and response.json()["error"]["field"] == field, response.text


async def test_a_default_past_its_limit_says_so(client, make_token):
    """Adaptive TBPTT's k_max defaults to 4·k1: past tbptt.k_max's limit, the 422 names the
    field the caller did not send and says it was the default."""
    body = {**JOB, "tbptt": {"mode": "adaptive", "k1": 30_000}}
    response = await client.post("/v1/jobs", json=body, headers=auth(make_token()))
    error = response.json()["error"]
    assert response.status_code == 422 and error["field"] == "tbptt.k_max", response.text
    assert "was not set" in error["message"] and "must be <= 100,000" in error["message"], error
    body["tbptt"]["k_max"] = 100_000  # set within the limit: accepted
    assert (await client.post("/v1/jobs", json=body, headers=auth(make_token()))).status_code == 201


async def test_an_operator_raises_a_limit(client, make_token, settings):
    settings.limits = {"max_attempts": 50}
    assert (await client.post("/v1/jobs", json={**JOB, "max_attempts": 50}, headers=auth(make_token()))).status_code == 201


async def test_a_sweep_point_past_a_limit_is_the_grids_fault(client, make_token):
    body = {"base": JOB, "grid": {"model.num_layers": [1, 64]}}
    response = await client.post("/v1/sweeps", json=body, headers=auth(make_token()))
    assert response.status_code == 422 and response.json()["error"]["field"] == "grid.model.num_layers", response.text


# --- every job ends: train.max_wall_s ---------------------------------------------------


async def test_a_job_gets_the_deployments_time_limit_and_cannot_exceed_it(client, make_token, settings):
    token = make_token()
    made = await client.post("/v1/jobs", json=JOB, headers=auth(token))
    assert made.status_code == 201 and made.json()["config"]["train"]["max_wall_s"] == 7 * 86400
    too_long = await client.post("/v1/jobs", json=job(train__max_wall_s=30 * 86400), headers=auth(token))
    assert too_long.status_code == 422 and too_long.json()["error"]["field"] == "train.max_wall_s", too_long.text
    settings.limits = {"train.max_wall_s": 3600}
    made = await client.post("/v1/jobs", json=JOB, headers=auth(token))
    assert made.json()["config"]["train"]["max_wall_s"] == 3600


# --- the memory a job's data takes (trainer.config.data_bytes) ---------------------------


async def test_data_that_would_not_fit_in_a_workers_memory_is_a_422(client, make_token, settings, data_root):
    token = make_token()
    # 10 million episodes of 1,000 steps: within each field's own bound, 320 TB together.
    # On c069bd3 a 201, and the worker would have built it (adding data is materialised).
    huge = {**JOB, "model": {"cell": "lstm", "hidden_size": 8}, "data": {"kind": "adding", "length": 1000, "episodes": 10_000_000}}
    response = await client.post("/v1/jobs", json=huge, headers=auth(token))
    assert response.status_code == 422 and response.json()["error"]["field"] == "data", response.text
    assert "UNROLL_MAX_DATA_BYTES" in response.json()["error"]["message"]
    sweep = await client.post("/v1/sweeps", json={"base": JOB, "grid": {"data": [huge["data"]]}}, headers=auth(token))
    assert sweep.status_code == 422, sweep.text
    # File data: the file's size says. A 100 kB text under a 1 MB cap is too much (the
    # tokens take ~55 bytes per character on the worker); a small one passes.
    settings.max_data_bytes = 1 << 20
    (data_root / "big.txt").write_text("ab cd\n" * 20_000)
    (data_root / "small.txt").write_text("ab cd\n" * 100)
    text = {**JOB, "data": {"kind": "text", "path": "big.txt"}}
    response = await client.post("/v1/jobs", json=text, headers=auth(token))
    assert response.status_code == 422 and response.json()["error"]["field"] == "data", response.text
    text["data"]["path"] = "small.txt"
    assert (await client.post("/v1/jobs", json=text, headers=auth(token))).status_code == 201
    uploaded = await client.post("/v1/datasets", params={"name": "big.txt"}, content=b"ab cd\n" * 20_000, headers=auth(token))
    assert uploaded.status_code == 201, uploaded.text
    text["data"] = {"kind": "text", "dataset": uploaded.json()["id"]}
    response = await client.post("/v1/jobs", json=text, headers=auth(token))
    assert response.status_code == 422 and response.json()["error"]["field"] == "data", response.text
