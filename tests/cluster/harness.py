"""The compose layout (tests/cluster/layout.py) started as processes on one machine: a
throwaway database on the machine's PostgreSQL, the machine's Redis under a prefix of the
cluster's own, `unroll db upgrade`, the API replicas, a Ray head and more Ray nodes joined
to it (each its own raylet, with its own declared CPUs and GPUs), and dispatchers. Each
process runs in its own session with its log under the cluster's directory; tests kill
them (a raylet, a dispatcher, an API replica) and start them again.

Ray nodes on one host share one IP address; a driver attaches to the head's raylet then
(Ray prefers the head among nodes of its host), so killing another node's raylet kills
only that node's tasks, as losing a host would. Each node declares a custom resource
`node:<name>`-like marker (`cluster_<name>`) that the dispatchers' heartbeats show, which
tells the tests when it has joined or left."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from service.store.keys import Keys
from tests.cluster.layout import Layout, flag, without
from tests.processes import free_port, listening

ROOT = Path(__file__).resolve().parents[2]
LEASE_SECONDS = 3
# The GCS declares a node dead after this many missed health checks of this period (Ray's
# defaults take 30 s); the dispatchers then see its tasks fail.
RAY_FAST_FAILURE = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def wait_for(check: Callable[[], object], timeout: float, what: str, logs: Callable[[], str] = lambda: "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except (httpx.HTTPError, redis.RedisError, OSError):
            result = None
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"{what}: not after {timeout:g}s\n{logs()}")


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log: Path
    port: int | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to the whole process group (the service and what it started)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@dataclass
class Node(Service):
    resource: str = ""
    raylet_pids: set[int] = field(default_factory=set)

    def raylet(self) -> psutil.Process | None:
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if child.name() == "raylet":
                self.raylet_pids.add(child.pid)
                return child
        return None


class Cluster:
    def __init__(self, directory: Path, database_url: str, redis_url: str, layout: Layout):
        self.directory, self.database_url, self.redis_url, self.layout = directory, database_url, redis_url, layout
        self.prefix = f"unroll-cluster-{secrets.token_hex(4)}"
        self.keys = Keys(self.prefix)
        self.ray_temp = f"/tmp/ray-cl-{secrets.token_hex(3)}"  # Ray's socket paths must stay short
        self.ray_port = free_port()
        self.services: list[Service] = []
        self.nodes: dict[str, Node] = {}
        self.apis: list[Service] = []
        self.dispatchers: list[Service] = []
        self.token = ""
        self.redis = redis.Redis.from_url(redis_url)
        self.redis_server: Any = None  # a private redis-server (tests.conftest.RedisServer) to restart, if any

    # -- processes -------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNROLL_")}
        env.update({
            "PYTHONPATH": str(ROOT),
            "RAY_USAGE_STATS_ENABLED": "0",
            "UNROLL_DATABASE_URL": self.database_url,
            "UNROLL_REDIS_URL": self.redis_url,
            "UNROLL_REDIS_PREFIX": self.prefix,
            "UNROLL_RAY_ADDRESS": f"127.0.0.1:{self.ray_port}",
            "UNROLL_ARTIFACTS": str(self.directory / "artifacts"),
            "UNROLL_LEASE_SECONDS": str(LEASE_SECONDS),
            "UNROLL_RETRY_BACKOFF_SECONDS": "0.5",
            "UNROLL_CANCEL_GRACE_SECONDS": "20",
            **extra,
        })
        missing = self.layout.unroll_env - set(env)
        assert not missing, f"docker-compose.yml gives its roles settings the harness does not: {sorted(missing)}"
        return env

    def spawn(self, name: str, command: list[str], env: dict[str, str], kind: type[Service] = Service, **fields) -> Service:
        log = self.directory / f"{name}-{len(self.services)}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        service = kind(name, proc, log, **fields)
        self.services.append(service)
        return service

    def unroll(self, args: list[str]) -> list[str]:
        return [sys.executable, "-m", "service.cli", *args]

    def logs(self, tail: int = 2500) -> str:
        return "\n".join(f"--- {s.log.name}\n{s.log.read_text(errors='replace')[-tail:]}" for s in self.services if s.log.exists())

    # -- the layout, in compose's order ------------------------------------------------------

    def start(self, *, gpu_node: bool = True) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.migrate()
        self.token = self.create_token("cluster")
        self.start_head()
        self.start_node("cpu", cpus=1, gpus=0)
        if gpu_node:
            self.start_node("gpu", cpus=1, gpus=self.layout.node_gpus)
        for _ in range(self.layout.api_replicas):
            self.start_api()
        wait_for(lambda: listening(self.ray_port), 90, "the Ray head", self.logs)
        for _ in range(2):
            self.start_dispatcher()
        for api in self.apis:
            wait_for(lambda api=api: httpx.get(f"http://127.0.0.1:{api.port}/healthz", timeout=2).status_code == 200, 90, f"API replica {api.log.name}", self.logs)
        self.wait_dispatchers(2)
        for name in self.nodes:
            self.wait_node(name, joined=True)

    def migrate(self) -> None:
        done = subprocess.run(self.unroll(self.layout.migrate), cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, f"unroll {' '.join(self.layout.migrate)} failed:\n{done.stdout}\n{done.stderr}"

    def create_token(self, project: str) -> str:
        done = subprocess.run(self.unroll(["token", "create", "--project", project]), cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    def ray(self, flags: list[str]) -> list[str]:
        return [sys.executable, "-m", "ray.scripts.scripts", "start", *flags, "--min-worker-port=0", "--max-worker-port=0"]

    def start_head(self) -> Node:
        flags = without(self.layout.head_flags, "port", "dashboard-host", "num-cpus")
        assert "--head" in flags and "--block" in flags, flags
        # CPU jobs run on the head too (as in compose), one at a time; no dashboard needed.
        command = self.ray([*flags, f"--port={self.ray_port}", "--num-cpus=1", "--include-dashboard=false",
                            f"--temp-dir={self.ray_temp}", '--resources={"cluster_head": 1}'])
        node = self.spawn("ray-head", command, self.env(**RAY_FAST_FAILURE), kind=Node, resource="cluster_head")
        self.nodes["head"] = node
        return node

    def start_node(self, name: str, *, cpus: int, gpus: int) -> Node:
        """A Ray node joined to the head: compose's `ray-worker` flags, with these CPUs and
        GPUs (Ray schedules against declared GPUs even where none exists)."""
        flags = without(self.layout.node_flags, "address", "num-cpus", "num-gpus", "resources")
        assert flag(self.layout.node_flags, "address"), self.layout.node_flags
        command = self.ray([*flags, f"--address=127.0.0.1:{self.ray_port}", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
                            f'--resources={{"cluster_{name}": 1}}'])
        node = self.spawn(f"ray-{name}", command, self.env(**RAY_FAST_FAILURE), kind=Node, resource=f"cluster_{name}")
        self.nodes[name] = node
        return node

    def start_api(self) -> Service:
        port = free_port()
        args = _set_option(_set_option(self.layout.api, "--host", "127.0.0.1"), "--port", str(port))
        api = self.spawn("api", self.unroll(args), self.env(), port=port)
        self.apis.append(api)
        return api

    def start_dispatcher(self) -> Service:
        dispatcher = self.spawn("dispatcher", self.unroll(self.layout.dispatcher), self.env())
        self.dispatchers.append(dispatcher)
        return dispatcher

    # -- what the cluster says --------------------------------------------------------------

    def heartbeats(self) -> dict[str, dict]:
        found = {}
        for key in self.redis.scan_iter(match=self.keys.dispatcher_heartbeats):
            raw = self.redis.get(key)
            if raw:
                status = json.loads(raw)
                found[status["dispatcher"]] = status
        return found

    def wait_dispatchers(self, count: int, timeout: float = 120) -> None:
        wait_for(lambda: len([s for s in self.heartbeats().values() if s.get("ray") == "ok"]) >= count, timeout,
                 f"{count} dispatchers with a heartbeat", self.logs)

    def node_joined(self, name: str) -> bool:
        """Every dispatcher's latest view of the cluster holds node `name`."""
        resource = self.nodes[name].resource
        beats = self.heartbeats().values()
        return bool(beats) and all(resource in s.get("cluster", {}) for s in beats)

    def wait_node(self, name: str, *, joined: bool, timeout: float = 120) -> None:
        wait_for(lambda: self.node_joined(name) == joined, timeout, f"node {name} {'joined' if joined else 'gone'}", self.logs)

    def node_of(self, pid: int) -> str | None:
        """The node whose raylet started process `pid` (a Ray worker), or None."""
        try:
            ancestors = {p.pid for p in psutil.Process(pid).parents()}
        except psutil.NoSuchProcess:
            return None
        for name, node in self.nodes.items():
            raylet = node.raylet() if node.alive() else None
            if raylet is not None and raylet.pid in ancestors:
                return name
        return None

    def kill_raylet(self, name: str) -> int:
        """kill -9 the raylet of node `name` (its tasks' processes die with it); its pid."""
        raylet = self.nodes[name].raylet()
        assert raylet is not None, f"node {name} has no raylet\n{self.logs()}"
        raylet.kill()
        return raylet.pid

    # -- stopping ---------------------------------------------------------------------------

    def stop(self) -> None:
        for service in reversed(self.services):  # dispatchers, APIs, then the Ray nodes
            if service.alive():
                os.killpg(service.proc.pid, signal.SIGTERM)
        for service in reversed(self.services):
            try:
                service.proc.wait(5 if isinstance(service, Node) else 20)
            except subprocess.TimeoutExpired:
                service.kill()
        shutil.rmtree(self.ray_temp, ignore_errors=True)
        keys = list(self.redis.scan_iter(match=f"{self.prefix}:*"))
        if keys:
            self.redis.delete(*keys)
        self.redis.close()


def _set_option(args: list[str], option: str, value: str) -> list[str]:
    """`args` with `option`'s value (the next item, or `option=value`) set to `value`."""
    out = list(args)
    for i, item in enumerate(out):
        if item == option:
            out[i + 1] = value
            return out
        if item.startswith(f"{option}="):
            out[i] = f"{option}={value}"
            return out
    return [*out, option, value]
