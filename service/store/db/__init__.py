"""Persistence: models (models.py), engines and sessions (session.py), job state
transitions (states.py), queries (repo.py), migrations (migrate.py)."""

from service.store.db.base import Base, new_id, utcnow
from service.store.db.errors import (
    DatabaseError,
    DatabaseUnavailable,
    IllegalTransition,
    NotFound,
    StaleAttempt,
)
from service.store.db.models import (
    ApiToken,
    Attempt,
    AttemptOutcome,
    Checkpoint,
    Dataset,
    Job,
    JobLog,
    JobState,
    Metric,
    Project,
    Sweep,
)

__all__ = [
    "ApiToken",
    "Attempt",
    "AttemptOutcome",
    "Base",
    "Checkpoint",
    "DatabaseError",
    "DatabaseUnavailable",
    "Dataset",
    "IllegalTransition",
    "Job",
    "JobLog",
    "JobState",
    "Metric",
    "NotFound",
    "Project",
    "StaleAttempt",
    "Sweep",
    "new_id",
    "utcnow",
]
