"""Alembic environment: the URL comes from the caller (service.store.db.migrate sets
`sqlalchemy.url`, or passes a live connection in `config.attributes["connection"]`) or
else from settings; the target is the models' metadata."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from service.store.db.base import Base
from service.store.db import models  # noqa: F401  (registers every table on Base.metadata)
from service.store.db.session import make_engine, sync_url
from service.store.settings import get_settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().database_url


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    dialect = connection.dialect.name if connection is not None else sync_url(url or _url()).get_backend_name()
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: batch mode recreates the table instead.
        render_as_batch=dialect == "sqlite",
        compare_type=True,
        literal_binds=connection is None,
    )


def run_migrations_offline() -> None:
    _configure(url=sync_url(_url()).render_as_string(hide_password=False))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    # Foreign keys off on SQLite: batch mode copies tables, which enforcement would block.
    engine = make_engine(_url(), poolclass=NullPool, foreign_keys=False)
    try:
        with engine.connect() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
