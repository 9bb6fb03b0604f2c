"""`unroll node`: which node a NODE argument names, and what it refuses before touching
anything (the drain itself runs against a real Ray node in tests/workers/test_preemption.py
and, with Ray's own drain, in tests/cluster/test_failures.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.cli.common import UsageError
from service.cli.node import find_node

A = {"NodeID": "a1b2c3d4e5f6" + "0" * 44, "NodeName": "10.0.0.1", "Alive": True}
B = {"NodeID": "a1b2c3ffffff" + "1" * 44, "NodeName": "10.0.0.1", "Alive": True}
C = {"NodeID": "0123456789ab" + "2" * 44, "NodeName": "gpu-7", "Alive": True}


def test_a_node_is_named_by_its_id_a_unique_prefix_or_a_unique_name():
    nodes = [A, B, C]
    assert find_node(nodes, A["NodeID"]) is A
    assert find_node(nodes, "a1b2c3d4") is A
    assert find_node(nodes, "gpu-7") is C
    with pytest.raises(UsageError, match="names 2 nodes"):
        find_node(nodes, "a1b2c3")  # a prefix both share
    with pytest.raises(UsageError, match="names 2 nodes"):
        find_node(nodes, "10.0.0.1")  # one host, two nodes: give the id
    with pytest.raises(UsageError, match="no alive node"):
        find_node(nodes, "a1b2")  # too short to be taken for a prefix
    with pytest.raises(UsageError, match="no alive node"):
        find_node(nodes, "ffffff")


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UNROLL_")}
    return subprocess.run([sys.executable, "-m", "service.cli", "node", *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_without_a_ray_cluster_or_with_bad_flags_nothing_is_touched():
    done = run("drain", "a1b2c3d4")
    assert done.returncode == 2 and "UNROLL_RAY_ADDRESS" in done.stderr
    for flags in (["--timeout", "0"], ["--timeout", "nan"], ["--timeout", "1e9"], ["--reason", ""], ["--reason", "x" * 201]):
        done = run("drain", "a1b2c3d4", "--wait", *flags)
        assert done.returncode == 2 and flags[0] in done.stderr, (flags, done.stderr)
