"""Constants and helpers of the API tests (importable, unlike conftest)."""

from __future__ import annotations

import copy
import secrets
import threading
import time

import uvicorn

from tests.processes import free_port

ADMIN_TOKEN = "admin-" + secrets.token_hex(8)

# A small, valid job (SPEC §2) that any test may submit.
JOB = {"model": {"cell": "lstm", "hidden_size": 8}, "data": {"kind": "recall", "length": 200}, "train": {"max_steps": 10}}


def job(**overrides):
    """JOB with fields replaced: job(name="x", train__max_steps=5)."""
    body = copy.deepcopy(JOB)
    for path, value in overrides.items():
        node = body
        *parents, leaf = path.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return body


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class LiveServer:
    """uvicorn serving an app in a thread of this process (its own event loop)."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
