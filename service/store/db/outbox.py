"""The events a transaction produces, handed on once it commits: how every job state
transition reaches the job's live event stream without anyone calling "publish".

The transitions (service.store.db.states) and an attempt's flush of metrics and log lines
(workers.reporter) `add` their events to the session they run in. Nothing leaves the
process then. When the transaction commits, the session's publisher gets every event it
added, at once and in the order they were added; when it rolls back, they are dropped. So:

- an event only ever says what the database already holds: a refused transition (a stale
  attempt, a job cancelled meanwhile) or a failed transaction says nothing;
- each transition is published once (by the process that committed it), in the order the
  process made them, with the attempt number it wrote;
- no caller can forget: whoever owns a sessionmaker gives it a publisher once
  (``sessionmaker(..., info=publishing(p))``, the dispatcher, the API runtime and
  ``workers.reporter.Attempt`` do), and every transition made through it is published.

A session without a publisher (tests, one-off tools) drops its events at commit. Across
processes, order follows causality: a process that commits a transition publishes it before
it does anything that lets another process act on it (the dispatcher publishes a claim
before it starts the attempt; the API publishes a retry before it enqueues the job).

What is not guaranteed: a process that dies between its commit and its publish loses those
events (the database still holds the truth; the API's streams re-read the job's state when
idle, so a stream still ends when its job does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

log = logging.getLogger("unroll.events")

# Keys of Session.info.
_PENDING = "unroll.outbox.pending"
_PUBLISHER = "unroll.outbox.publisher"

# (job id, event) pairs, in the order they were added.
Batch = list[tuple[str, dict[str, Any]]]
Publisher = Callable[[Batch], None]


def publishing(publisher: Publisher) -> dict[str, Any]:
    """The `info` of a sessionmaker (or Session) whose committed events go to `publisher`.
    The publisher is called in the committing thread, right after the commit: it must not
    raise, and should not block for long (service.store.events has both kinds)."""
    return {_PUBLISHER: publisher}


def add(session: Session, job_id: str, event: Mapping[str, Any]) -> None:
    """Publish `event` of `job_id` when (and only if) the session's transaction commits."""
    session.info.setdefault(_PENDING, []).append((job_id, dict(event)))


def pending(session: Session) -> Batch:
    """What the session's open transaction would publish (for tests)."""
    return list(session.info.get(_PENDING, ()))


@event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    batch = session.info.pop(_PENDING, None)
    publisher = session.info.get(_PUBLISHER)
    if not batch or publisher is None:
        return
    try:
        publisher(batch)
    except Exception:  # the commit stands; events are a view of it
        log.exception("publishing %d event(s) failed", len(batch))


@event.listens_for(Session, "after_transaction_end")
def _ended(session: Session, transaction: Any) -> None:
    # Runs after _committed on a commit; on a rollback, or a session closed without
    # committing, what the transaction added never happened.
    if transaction.parent is None:
        session.info.pop(_PENDING, None)
