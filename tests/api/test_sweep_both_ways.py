"""The same sweep sent over HTTP and with `unroll sweep` trains identical jobs: the
expansion and the "tbptt.k2 follows tbptt.k1" rule live in one domain module
(service/store/sweeps.py) that the API applies, whoever the client is."""

from __future__ import annotations

import argparse
import asyncio

import httpx
import yaml

from service.cli import sweep as sweep_cli
from tests.api.helpers import auth

BASE = {
    "name": "k",
    "model": {"cell": "lstm", "hidden_size": 8},
    "data": {"kind": "recall", "length": 200, "lag": 3},
    "tbptt": {"k1": 24, "k2": 48},  # k2 is not used when only k1 is swept
    "train": {"max_steps": 10, "seed": 5},
}


def _job_configs(url: str, token: str, sweep_id: str) -> list[dict]:
    with httpx.Client(base_url=url, headers=auth(token), timeout=30) as http:
        sweep = http.get(f"/v1/sweeps/{sweep_id}").json()
        return [http.get(f"/v1/jobs/{row['job_id']}").json()["config"] for row in sweep["jobs"]]


def _submit_over_http(url: str, token: str) -> str:
    body = {"base": BASE, "grid": {"tbptt.k1": [4, 8]}, "seeds": 2}
    response = httpx.post(f"{url}/v1/sweeps", json=body, headers=auth(token), timeout=30)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _submit_with_the_cli(url: str, token: str, tmp_path, capsys) -> str:
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    parser = argparse.ArgumentParser()
    sweep_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["sweep", str(path), "--grid", "tbptt.k1=4,8", "--seeds", "2", "--url", url, "--token", token])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "tbptt.k2 follows tbptt.k1" in out.err
    return out.out.split()[0]


async def test_a_sweep_over_http_and_from_the_cli_yields_identical_jobs(live_server, make_token, tmp_path, capsys):
    token = make_token("both-ways")
    url = live_server.url
    over_http = await asyncio.to_thread(_submit_over_http, url, token)
    from_cli = await asyncio.to_thread(_submit_with_the_cli, url, token, tmp_path, capsys)
    http_configs = await asyncio.to_thread(_job_configs, url, token, over_http)
    cli_configs = await asyncio.to_thread(_job_configs, url, token, from_cli)
    assert len(http_configs) == 4
    assert http_configs == cli_configs
    # The rule itself: k2 follows each point's k1, the base's k2 of 48 is not used.
    assert [(c["tbptt"]["k1"], c["tbptt"]["k2"], c["train"]["seed"]) for c in http_configs] == [
        (4, 4, 5), (4, 4, 6), (8, 8, 5), (8, 8, 6)
    ]
