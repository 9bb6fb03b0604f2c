"""What the tests that start real processes share: a free port, whether something listens
on one, and the command of a local Ray head of their own."""

from __future__ import annotations

import os
import socket
import sys


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def ray_head(port: int, temp_dir: str) -> tuple[list[str], dict[str, str]]:
    """`ray start --head` in the foreground for a cluster of the tests' own (2 CPUs, no
    GPU, no dashboard, files under `temp_dir`), and its environment (token auth, the default
    for new clusters, made explicit; tests/conftest.py provides the token)."""
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
        "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
        "--min-worker-port=0", "--max-worker-port=0", f"--temp-dir={temp_dir}",
    ]
    return command, {**os.environ, "RAY_AUTH_MODE": "token"}
