"""The declarative base, column types and ids shared by every model."""

from __future__ import annotations

import math
import secrets
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase

# Constraint names are part of the schema: with a convention they are the same on every
# database and in every migration, so later migrations can refer to them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, on every database.

    PostgreSQL stores `timestamptz`; SQLite has no time zones, so naive UTC is stored and
    UTC is attached on the way back (otherwise the two dialects would return different
    kinds of datetimes and comparisons between them would raise).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# JSON documents: JSONB on PostgreSQL (indexable, `@>` for tag filters), JSON elsewhere.
JSONDoc = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def unstorable(value: Any, path: str = "") -> tuple[str, str] | None:
    """(path, problem) of the first part of a JSON value that a JSONDoc column cannot hold
    on every database: a NUL character in a string or key, or a NaN or infinite number
    (JSON has neither; PostgreSQL's JSONB refuses both). None when all of it can be stored."""
    if isinstance(value, str):
        return (path, "must not contain NUL characters") if "\x00" in value else None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, "must be a finite number")
    if isinstance(value, dict):
        items = [(f"{path}.{key}" if path else str(key), key, item) for key, item in value.items()]
    elif isinstance(value, list):
        items = [(f"{path}.{index}" if path else str(index), "", item) for index, item in enumerate(value)]
    else:
        return None
    for sub, key, item in items:
        if "\x00" in str(key):
            return sub, "must not contain NUL characters"
        found = unstorable(item, sub)
        if found is not None:
            return found
    return None

# A 64-bit autoincrement key; SQLite only autoincrements an INTEGER PRIMARY KEY.
BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


# Every object id is "<kind prefix>_<16 hex chars>" (64 random bits): short enough to type,
# tells at a glance what it names, and needs no coordination between processes.
ID_PREFIXES = {
    "project": "prj",
    "token": "tok",
    "job": "job",
    "sweep": "swp",
    "dataset": "ds",
}
ID_LENGTH = 32  # column width; ids are at most 3 + 1 + 16 characters today


def new_id(kind: str) -> str:
    return f"{ID_PREFIXES[kind]}_{secrets.token_hex(8)}"


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
