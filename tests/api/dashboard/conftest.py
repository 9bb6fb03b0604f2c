"""The dashboard in a real browser, against the real stack: `unroll api` and `unroll worker`
as subprocesses, a Ray head of this module's own, PostgreSQL (SQLite without a server) and
the Redis of tests/conftest.py. Chromium is Debian's (/usr/bin/chromium), driven by
Playwright for Python; nothing is downloaded.

- ``dashboard``: the running stack (module scope): ``.url``, ``.token``, ``.api`` (an
  httpx client with the token), ``.submit(config)``, ``.sweep(body)``, ``.wait(job_id, ...)``.
- ``page``: a browser page already signed in (the token in localStorage, as after login);
  ``fresh_page``: one that is not.
- ``screenshot(page, name)``: saves test-output/screenshots/NAME.png and prints the path.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.api.dashboard import built
from service.store.db import repo
from service.store.db.session import make_engine
from tests.processes import RayHead, free_port, start_ray_head

ROOT = Path(__file__).resolve().parents[3]
CHROMIUM = Path(os.environ.get("UNROLL_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOTS = ROOT / "test-output" / "screenshots"
FINAL = {"succeeded", "failed", "cancelled"}



def _needs_browser() -> None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install playwright; never `playwright install`)")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set UNROLL_TEST_CHROMIUM)")
    if not built():
        pytest.skip("the dashboard is not built: run `make dashboard` (npm ci && npm run build in frontend/)")


class Stack:
    def __init__(self, directory: Path, database_url: str, redis_url: str) -> None:
        self.directory = directory
        self.database_url = database_url
        self.redis_url = redis_url
        self.prefix = f"unroll-dash-{secrets.token_hex(4)}"
        self.processes: list[tuple[subprocess.Popen, Path]] = []
        self.head: RayHead | None = None
        self.url = ""
        self.token = ""
        self.api: httpx.Client | None = None

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNROLL_")}
        env.update({
            "PYTHONPATH": str(ROOT),
            "UNROLL_DATABASE_URL": self.database_url,
            "UNROLL_REDIS_URL": self.redis_url,
            "UNROLL_REDIS_PREFIX": self.prefix,
            "UNROLL_ARTIFACTS": str(self.directory / "artifacts"),
            "UNROLL_LEASE_SECONDS": "5",
            "UNROLL_CANCEL_GRACE_SECONDS": "20",
            **extra,
        })
        return env

    def spawn(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.directory / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((proc, log))
        return proc

    def logs(self) -> str:
        logs = [log for _, log in self.processes] + ([self.head.log] if self.head else [])
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in logs if log.exists())

    def start(self) -> None:
        with _sessions(self.database_url) as session:
            project = repo.get_or_create_project(session, f"dash-{secrets.token_hex(3)}")
            self.token, _ = repo.create_token(session, project.id, name="dashboard tests")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.spawn("api", [sys.executable, "-m", "service.cli", "api", "--port", str(port)], self.env())
        self.head = start_ray_head(self.directory, cwd=ROOT)  # while the API starts
        _wait_for(lambda: httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200, 60, "unroll api", self)
        self.spawn("worker", [sys.executable, "-m", "service.cli", "worker"], self.env(UNROLL_RAY_ADDRESS=self.head.address))
        self.api = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    def stop(self) -> None:
        if self.api is not None:
            self.api.close()
        for proc, _ in reversed(self.processes):  # the worker, then the API
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.head is not None:
            self.head.stop()

    # -- driving the API -------------------------------------------------------------------

    def submit(self, config: dict) -> dict:
        r = self.api.post("/v1/jobs", json=config)
        assert r.status_code == 201, r.text
        return r.json()

    def sweep(self, body: dict) -> dict:
        r = self.api.post("/v1/sweeps", json=body)
        assert r.status_code == 201, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        return self.api.get(f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, states: set[str], timeout: float = 120, step: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] in states and job["step"] >= step:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"{job_id} is {job['state']} at step {job['step']} after {timeout}s\n{self.logs()}")
            time.sleep(0.3)

    def metrics(self, job_id: str, names: list[str], max_points: int) -> dict[str, list]:
        r = self.api.get(f"/v1/jobs/{job_id}/metrics", params={"names": ",".join(names), "max_points": max_points})
        assert r.status_code == 200, r.text
        return r.json()["series"]


class _sessions:
    """A committed session on the test database (a short-lived engine)."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)

    def __enter__(self):
        from sqlalchemy.orm import Session

        self.session = Session(self.engine)
        return self.session

    def __exit__(self, kind, *exc) -> None:
        if kind is None:
            self.session.commit()
        self.session.close()
        self.engine.dispose()


def _wait_for(check, timeout: float, what: str, stack: Stack) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start in {timeout}s\n{stack.logs()}")


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str) -> Iterator[Stack]:
    _needs_browser()
    stack = Stack(tmp_path_factory.mktemp("dashboard"), database_url, redis_url)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def browser(dashboard: Stack):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def fresh_page(browser, dashboard: Stack):
    context = browser.new_context(base_url=dashboard.url, viewport={"width": 1366, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"{exc}\n{getattr(exc, 'stack', '')}"))
    page.errors = errors  # type: ignore[attr-defined]
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def page(fresh_page, dashboard: Stack):
    """Signed in: the token is in localStorage before the first script runs."""
    fresh_page.context.add_init_script(f"localStorage.setItem('unroll.token', {dashboard.token!r})")
    return fresh_page


@pytest.fixture
def screenshot():
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def take(page, name: str) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    return take
