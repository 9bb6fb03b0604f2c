"""Migrations: an empty database goes to head and back to base, and the models agree
with the migrations (autogenerate finds nothing to do)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from service.store.db.base import Base
from service.store.db.migrate import current, downgrade, upgrade
from service.store.db.session import make_engine

from .test_metric_blocks import brute_blocks, stored_blocks

TABLES = {t.name for t in Base.metadata.sorted_tables}


def _tables(url: str) -> set[str]:
    engine = make_engine(url, poolclass=NullPool)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_to_head_and_back_to_base(empty_db_url: str) -> None:
    assert current(empty_db_url) is None
    upgrade(empty_db_url)
    assert _tables(empty_db_url) == TABLES
    assert current(empty_db_url) == "0005"
    downgrade(empty_db_url, "base")
    assert _tables(empty_db_url) == set()
    assert current(empty_db_url) is None
    upgrade(empty_db_url)  # and up again: downgrade left nothing behind
    assert _tables(empty_db_url) == TABLES


def test_models_match_migrations(db_url: str) -> None:
    engine = make_engine(db_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "render_as_batch": engine.dialect.name == "sqlite"}
            )
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], f"models and migrations disagree; write a migration for: {diff}"


def test_upgrade_works_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNROLL_DATABASE_URL", "sqlite:///nested/dir/unroll.db")
    upgrade()  # the default URL from settings, relative to this directory
    assert (tmp_path / "nested" / "dir" / "unroll.db").exists()
    assert _tables(f"sqlite:///{tmp_path / 'nested/dir/unroll.db'}") == TABLES
    assert os.getcwd() == str(tmp_path)


def test_metric_blocks_are_backfilled_from_existing_points(empty_db_url: str) -> None:
    # A database at 0001 already holds points: 0002 must summarise them, not start empty.
    downgrade(empty_db_url, "base")
    upgrade(empty_db_url, "0001")
    rng = random.Random(3)
    values = {s: (None if s % 41 == 0 else rng.random()) for s in range(0, 1000)}
    engine = make_engine(empty_db_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO metrics (job_id, name, step, attempt, value) VALUES ('job_x', 'loss', :s, 1, :v)"),
                [{"s": s, "v": v} for s, v in values.items()],
            )
        upgrade(empty_db_url)
        with Session(engine) as session:
            assert stored_blocks(session, "job_x", "loss") == brute_blocks(values)
    finally:
        engine.dispose()


def test_jobs_resources_are_backfilled_from_their_configs(empty_db_url: str) -> None:
    # A database at 0002 holds jobs: 0003 must say what each holds (cpus x workers), or a
    # project's running jobs would count as one CPU each against its quota.
    downgrade(empty_db_url, "base")
    upgrade(empty_db_url, "0002")
    configs = {
        "job_default": {"data": {"kind": "adding"}},
        "job_group": {"data": {"kind": "adding"}, "resources": {"cpus": 2, "gpus": 0.5, "workers": 3}},
        "job_half": {"data": {"kind": "adding"}, "resources": {"cpus": 0.5}},
    }
    engine = make_engine(empty_db_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO projects (id, name, created_at) VALUES ('project_a', 'a', CURRENT_TIMESTAMP)"))
            for job_id, config in configs.items():
                conn.execute(
                    sa.text(
                        "INSERT INTO jobs (id, project_id, tags, config, state, priority, attempt, max_attempts, retry_base,"
                        " step, progress, created_at, updated_at) VALUES (:id, 'project_a', '[]', :config, 'running', 0, 1, 3, 0,"
                        " 0, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                    ),
                    {"id": job_id, "config": json.dumps(config)},
                )
        upgrade(empty_db_url)
        with engine.connect() as conn:
            held = {row.id: (row.cpus, row.gpus) for row in conn.execute(sa.text("SELECT id, cpus, gpus FROM jobs"))}
        assert held == {"job_default": (1.0, 0.0), "job_group": (6.0, 1.5), "job_half": (0.5, 0.0)}
    finally:
        engine.dispose()
