"""A job's states and an attempt's outcomes (SPEC §4), and the rules named on them.

This module holds no SQL and imports nothing heavy, so the command line can read the state
names too. The transitions themselves live in service.store.db.states; the SQL forms of
the rules below live beside them (service.store.db.fencing).
"""

from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    # Committed and waiting for a worker (also after a lost worker, or a retry).
    QUEUED = "queued"
    # Claimed by a worker: `attempt` is the running try, fenced by a lease.
    RUNNING = "running"
    # The attempt finished training and reported success. Terminal. A sweep trial that its
    # early stopping stopped at a rung ends here too, with summary.stopped "early" (not a
    # failure, and told apart from "completed"); the sweep's rule may resume it later
    # (succeeded → queued: service.store.db.early_stop.resume), from its checkpoint there.
    SUCCEEDED = "succeeded"
    # The attempt reported an error, or the job ran out of attempts. Terminal; retry-able.
    FAILED = "failed"
    # Cancelled by a user (directly when queued, observed by the attempt when running).
    # Terminal; retry-able.
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Nothing happens to the job any more unless someone retries it."""
        return self not in (JobState.QUEUED, JobState.RUNNING)


# Derived from the enum, so a new state is terminal or not in one place.
TERMINAL_STATES = frozenset(state for state in JobState if state.terminal)
# The same as plain strings, for clients that read states off the wire.
TERMINAL_STATE_NAMES = frozenset(state.value for state in TERMINAL_STATES)


class AttemptOutcome(str, enum.Enum):
    # How one try of a job ended (NULL while it runs).
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Its lease expired (worker unreachable); the job was requeued or, out of attempts, failed.
    LOST = "lost"
