"""Apply Alembic migrations from code (`unroll db upgrade`), from any working directory."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

from service.store.settings import get_settings

# The repository root holds alembic.ini and migrations/ (the package is installed editable).
ROOT = Path(__file__).resolve().parents[3]
ALEMBIC_INI = ROOT / "alembic.ini"
MIGRATIONS = ROOT / "migrations"


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """An Alembic Config for this repository, bound to `url` (default: settings) or to an
    open connection."""
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS))
    # '%' is interpolation syntax in ini values (a password may contain one).
    config.set_main_option("sqlalchemy.url", (url or get_settings().database_url).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Migrate the database at `url` (default: UNROLL_DATABASE_URL) up to `revision`."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None, revision: str) -> None:
    """Migrate down to `revision` ("base" empties the schema)."""
    command.downgrade(alembic_config(url), revision)


def current(url: str | None = None) -> str | None:
    """The revision the database is at (None for an unmigrated database)."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy.pool import NullPool

    from service.store.db.session import make_engine

    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
