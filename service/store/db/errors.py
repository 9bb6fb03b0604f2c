"""Typed errors of the persistence layer. The API maps them to HTTP statuses."""

from __future__ import annotations


class DatabaseError(Exception):
    """Base class of every error raised on purpose by service.store.db."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached (refused, lost connection, locked too long): 503."""


class NotFound(DatabaseError):
    """No such object (or it belongs to another project): 404."""

    def __init__(self, kind: str, object_id: str) -> None:
        super().__init__(f"{kind} {object_id!r} not found")
        self.kind = kind
        self.object_id = object_id


class IllegalTransition(DatabaseError):
    """The job is not in a state this transition starts from: 409."""

    def __init__(self, job_id: str, current: str | None, wanted: str) -> None:
        super().__init__(f"job {job_id!r} is {current}; cannot {wanted}")
        self.job_id = job_id
        self.current = current
        self.wanted = wanted


class StaleAttempt(DatabaseError):
    """A write by an attempt that is no longer the job's running attempt; refused."""

    def __init__(self, job_id: str, attempt: int) -> None:
        super().__init__(f"attempt {attempt} of job {job_id!r} is not the running attempt")
        self.job_id = job_id
        self.attempt = attempt


class InUse(DatabaseError):
    """The object is still used (a dataset by queued or running jobs): 409."""

    def __init__(self, kind: str, object_id: str, users: list[str]) -> None:
        super().__init__(f"{kind} {object_id!r} is used by {', '.join(users)}")
        self.kind = kind
        self.object_id = object_id
        self.users = users
