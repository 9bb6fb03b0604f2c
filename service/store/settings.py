"""Every setting of the service, read from the environment (prefix ``UNROLL_``) or ``.env``.

One class, one cached accessor. Nothing here connects to anything: reading settings is
free, so any module may call ``get_settings()`` at call time (never at import time, so that
tests can change the environment and call ``get_settings.cache_clear()``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.store.keys import DEFAULT_PREFIX
from service.store.limits import effective


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="UNROLL_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    # --- where things live (SPEC §6) ---
    # Any SQLAlchemy URL; the driver is chosen per role (service.store.db.session), so
    # `postgresql://...` serves both the async API (asyncpg) and sync workers (psycopg).
    database_url: str = "sqlite:///.unroll/unroll.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Every Redis key starts with this (service.store.keys), so deployments can share a server.
    redis_prefix: str = DEFAULT_PREFIX
    # None: start a local Ray instance.
    ray_address: str | None = None
    # Artifact store root: a local path or any fsspec URL.
    artifacts: str = ".unroll/artifacts"
    # Directories that a job's `data.path` may point into. The environment form is a
    # list separated by os.pathsep or commas (or a JSON list).
    data_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)

    # --- access and quotas ---
    admin_token: SecretStr | None = None
    # Defaults of every project's quota (service.store.quotas; an admin sets a project's own
    # with `unroll project set`): queued jobs, and the highest priority a job may have.
    max_queued_per_project: int = Field(default=10_000, ge=0)
    max_priority: int = Field(default=100, ge=-(2**31), le=2**31 - 1)
    # Requests of one project in one API process (service.api.admission): at most this many
    # run at once (its event streams: max_streams_per_project), the next ones wait their
    # turn, and another project's never wait behind them ...
    requests_in_progress_per_project: int = Field(default=8, ge=1, le=10_000)
    # ... at most this many of each kind wait (429 past it; 0: no admission at all) ...
    max_requests_per_project: int = Field(default=64, ge=0, le=1_000_000)
    # ... each at most this long (then a 429).
    admission_wait_s: float = Field(default=30.0, gt=0, le=3600)
    # The largest model (parameter count) a job may ask for.
    max_params: int = Field(default=50_000_000, ge=1)
    # The most memory a job's data may take on a worker (trainer.config.data_bytes).
    max_data_bytes: int = Field(default=8 << 30, ge=1)
    # Overrides of the per-field bounds of service.store.limits: {"model.num_layers": 64}.
    limits: dict[str, float] = Field(default_factory=dict)

    # --- the HTTP API (service.api.app) ---
    # Largest JSON request body (413 beyond); uploads have their own cap.
    max_body_bytes: int = Field(default=1 << 20, ge=1)
    # Largest dataset upload, streamed to the artifact store (413 beyond).
    max_upload_bytes: int = Field(default=1 << 30, ge=1)
    # All of one project's datasets together (429 beyond, checked while an upload streams).
    max_dataset_bytes_per_project: int = Field(default=10 << 30, ge=0)
    # An upload whose client sends nothing for this long is refused (408) and removed: a
    # stalled client holds no connection or thread longer.
    upload_read_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # Most jobs one sweep may expand to (grid points x seeds).
    max_sweep_jobs: int = Field(default=1000, ge=1)
    # How long a verified token is trusted without asking the database again (a revoked
    # token keeps working this long at most).
    token_cache_seconds: float = Field(default=30.0, ge=0)

    # --- live event streams (service.api.streams) ---
    # Open GET /v1/jobs/{id}/events streams of one project on one API process (the next
    # ones wait, as requests past their share do: service.api.admission).
    max_streams_per_project: int = Field(default=20, ge=1)
    # A stream ends after this long (an `end` event; the client reconnects with
    # Last-Event-ID), so that a job that never starts holds no connection forever.
    stream_max_seconds: float = Field(default=1800.0, gt=0, le=86_400)
    # An idle stream sends a keep-alive comment this often, and looks at its job's state.
    stream_keepalive_seconds: float = Field(default=15.0, gt=0, le=300)

    # --- using trained models (service.api.models, service.store.model_sessions) ---
    # Loaded models an API process keeps (least recently used first out); each is one
    # job's checkpoint, loaded once, never per request.
    model_cache_size: int = Field(default=4, ge=1, le=1000)
    # An inference session's hidden state lives this long in Redis after its last use.
    session_ttl_s: int = Field(default=3600, ge=1, le=30 * 86400)
    # Live inference sessions of one project (429 beyond).
    max_sessions_per_project: int = Field(default=100, ge=1)

    # --- execution ---
    # A running attempt must renew its lease within this many seconds or it is lost.
    lease_seconds: int = Field(default=30, ge=1)
    # First delay before a lost attempt is retried; it doubles per attempt (at most 5 min).
    retry_backoff_seconds: float = Field(default=2.0, ge=0)
    # A running attempt that ignores a cancel request this long is stopped by force.
    cancel_grace_seconds: float = Field(default=30.0, gt=0)
    # A running attempt runs at least this long before a higher-priority job may preempt it
    # (UNROLL_MIN_RUN_S; workers.preemption).
    min_run_s: float = Field(default=60.0, ge=0, le=86400)

    # --- observability ---
    # Level of the `unroll` loggers (JSON lines on stderr). `unroll api --log-level` sets it.
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    # FastAPI's OpenTelemetry spans, metrics and logs, sent to the providers configured in
    # the process (opentelemetry-instrument, or an embedding program). Off: nothing is
    # checked per request; Prometheus /metrics is always on.
    otel: bool = False

    # --- database tuning ---
    db_pool_size: int = Field(default=5, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    # Seconds to wait for a connection to the server before reporting it unavailable.
    db_connect_timeout: float = Field(default=5.0, gt=0)
    # SQLite: how long a writer waits for the lock held by another writer.
    sqlite_busy_timeout_ms: int = Field(default=5_000, ge=0)
    db_echo: bool = False

    @field_validator("limits")
    @classmethod
    def _known_limits(cls, value: dict[str, float]) -> dict[str, float]:
        effective(value)  # ValueError names an unknown field or a bad bound
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return []
            if text.startswith("["):
                import json

                return json.loads(text)
            parts = [p for chunk in text.split(os.pathsep) for p in chunk.split(",")]
            return [p.strip() for p in parts if p.strip()]
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings. Tests override with ``get_settings.cache_clear()``."""
    return Settings()
