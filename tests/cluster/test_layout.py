"""The layout the cluster tests start is the one docker-compose.yml deploys."""

from __future__ import annotations

import pytest
import yaml

from tests.cluster.layout import COMPOSE, LayoutError, flag, read_layout


def test_the_compose_file_s_roles_are_the_ones_the_harness_starts():
    layout = read_layout()
    assert layout.migrate == ["db", "upgrade"]
    assert layout.api[0] == "api" and layout.api_replicas >= 2
    assert layout.dispatcher == ["worker"]
    assert "--head" in layout.head_flags and flag(layout.node_flags, "address")
    assert layout.node_gpus == 1
    assert {"UNROLL_DATABASE_URL", "UNROLL_REDIS_URL", "UNROLL_RAY_ADDRESS"} <= layout.unroll_env


@pytest.mark.parametrize("change", ["add", "remove"])
def test_a_service_the_harness_does_not_know_fails_the_layout(tmp_path, change):
    compose = yaml.safe_load(COMPOSE.read_text())
    if change == "add":
        compose["services"]["scheduler"] = {"image": "unroll:latest", "command": ["unroll", "scheduler"]}
    else:
        del compose["services"]["dispatcher"]
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(compose))
    with pytest.raises(LayoutError, match="scheduler" if change == "add" else "dispatcher"):
        read_layout(path)
