"""Queries and writes of the service, one module per aggregate, one function per question.
Each takes a sync Session and never commits: the caller owns the transaction
(``session_scope``, or ``await async_session.run_sync(fn, ...)`` from async code). Job state
changes are not here: they belong to service.store.db.states.

Writes made on behalf of an attempt (metrics, checkpoints, log lines) are fenced (fencing.py):
each is a single ``INSERT … SELECT … WHERE EXISTS (the job runs this attempt)`` statement, so a
stale attempt's write is refused (StaleAttempt) and never half-applied.

This package re-exports each module's public names, so callers write ``repo.get_job``.
"""

from service.store.db.repo.datasets import (
    create_dataset,
    get_dataset,
    list_datasets,
)
from service.store.db.repo.jobs import (
    JOB_INSERT_COLUMNS,
    cancel_overdue,
    count_jobs_by_state,
    count_queued,
    create_job,
    dispatchable_jobs,
    existing_job_for_key,
    get_job,
    get_job_by_idempotency_key,
    get_job_if_claimable,
    insert_job,
    list_jobs,
    new_job_row,
    new_job_values,
    queued_job_ids,
    set_pending_reason,
)
from service.store.db.repo.metrics import (
    MetricPoint,
    insert_metrics,
    last_metrics,
    metric_names,
    read_series,
)
from service.store.db.repo.outputs import (
    LogLine,
    add_checkpoint,
    append_logs,
    get_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    read_logs,
)
from service.store.db.repo.projects import (
    TOKEN_PREFIX,
    authenticate,
    create_token,
    get_or_create_project,
    get_project,
    get_token,
    hash_token,
    list_tokens,
    revoke_token,
)
from service.store.db.repo.sweeps import (
    count_running_in_sweep,
    create_sweep,
    get_sweep,
    list_sweep_jobs,
    sweep_state,
    sweep_state_counts,
)

__all__ = [
    "JOB_INSERT_COLUMNS",
    "LogLine",
    "MetricPoint",
    "TOKEN_PREFIX",
    "add_checkpoint",
    "append_logs",
    "authenticate",
    "cancel_overdue",
    "count_jobs_by_state",
    "count_queued",
    "count_running_in_sweep",
    "create_dataset",
    "create_job",
    "create_sweep",
    "create_token",
    "dispatchable_jobs",
    "existing_job_for_key",
    "get_checkpoint",
    "get_dataset",
    "get_job",
    "get_job_by_idempotency_key",
    "get_job_if_claimable",
    "get_or_create_project",
    "get_project",
    "get_sweep",
    "get_token",
    "hash_token",
    "list_tokens",
    "insert_job",
    "insert_metrics",
    "last_metrics",
    "latest_checkpoint",
    "list_checkpoints",
    "list_datasets",
    "list_jobs",
    "list_sweep_jobs",
    "metric_names",
    "new_job_row",
    "new_job_values",
    "queued_job_ids",
    "read_logs",
    "read_series",
    "revoke_token",
    "set_pending_reason",
    "sweep_state",
    "sweep_state_counts",
]
