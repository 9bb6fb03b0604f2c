"""Settings: defaults from SPEC §6, the environment, and the cache tests rely on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.store.settings import Settings, get_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    for name in list(os.environ):
        if name.startswith("UNROLL_"):
            monkeypatch.delenv(name)
    s = Settings()
    assert s.database_url == "sqlite:///.unroll/unroll.db"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.ray_address is None and s.admin_token is None
    assert s.artifacts == ".unroll/artifacts" and s.data_roots == []
    assert (s.max_queued_per_project, s.max_params, s.lease_seconds) == (10_000, 50_000_000, 30)


def test_environment_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNROLL_DATABASE_URL", "postgresql://h/db")
    monkeypatch.setenv("UNROLL_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("UNROLL_MAX_PARAMS", "1000")
    s = get_settings()
    assert s is get_settings()
    assert s.database_url == "postgresql://h/db" and s.max_params == 1000
    assert s.admin_token.get_secret_value() == "s3cret" and "s3cret" not in repr(s)
    monkeypatch.setenv("UNROLL_MAX_PARAMS", "2000")
    assert get_settings().max_params == 1000  # cached ...
    get_settings.cache_clear()
    assert get_settings().max_params == 2000  # ... until cleared


@pytest.mark.parametrize(
    "raw", [f"/data/a{os.pathsep}/data/b", "/data/a,/data/b", '["/data/a", "/data/b"]', " /data/a , /data/b "]
)
def test_data_roots_forms(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("UNROLL_DATA_ROOTS", raw)
    assert Settings().data_roots == [Path("/data/a"), Path("/data/b")]


def test_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("UNROLL_LEASE_SECONDS", raising=False)
    (tmp_path / ".env").write_text("UNROLL_LEASE_SECONDS=7\n")
    assert Settings().lease_seconds == 7
