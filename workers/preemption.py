"""Preemption: a waiting job of higher priority takes the slot of a running one, and no work
is lost.

When a queued job cannot be placed because the cluster is full, the dispatcher asks
`choose` which of its running attempts to stop: only jobs that are `preemptible` (the
default; a job config may say `preemptible: false`), of strictly lower priority, that have
run at least UNROLL_MIN_RUN_S (Settings.min_run_s), and that this same waiting job did not
preempt last time (nothing is preempted twice in a row for one waiting job). The lowest
priorities go first, the youngest attempt first among equals (it has the least to redo if
its checkpoint is older), and only as many as the waiting job needs; none if even all of
them would not make room.

The request is a Redis key (Keys.preempt_request) naming the attempt and the waiting
job. The attempt's `PreemptStop` callback reads it between updates (at most every
POLL_S): the loop stops with `stopped = "preempted"` and checkpoints there, and
`hand_back` then writes the last metrics, the checkpoint and the hand-back
(running → queued, not counted against max_attempts: nothing failed) in one transaction.
The attempt's own outcome is recorded as `lost` with the reason "preempted by job ...", and
the job's log and `state` event say who preempted it. The dispatcher puts it back in the
queue at once; it resumes from that checkpoint with the losses of a run never stopped.

A node drain (`unroll node drain`, service/cli/node.py) ends attempts the same way: its key
(Keys.node_drain) names the Ray node an attempt runs on, which the callback reads in the
same round trip as its own request, and the hand-back says which node was drained and why.
Ray places nothing new on a draining node, so the job resumes on another.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from service.store.db import states
from service.store.keys import Keys
from trainer.loop import Callback, Summary
from workers.placement import Needs

log = logging.getLogger("unroll.preemption")

PREEMPTED = "preempted"  # Summary.stopped of an attempt that handed its slot back
POLL_S = 0.25
REQUEST_TTL_S = 3600


@dataclass(frozen=True)
class Candidate:
    """What the policy knows of one running attempt."""

    job_id: str
    attempt: int
    priority: int
    preemptible: bool
    ran_s: float
    cpus: float  # in all (every worker's)
    gpus: float
    stopping: bool = False  # asked to stop already (its resources are on their way back)
    last_preempted_for: str | None = None


def choose(waiting: str, priority: int, needs: Needs, free: dict[str, float], running: Sequence[Candidate], min_run_s: float) -> list[Candidate]:
    """The attempts to stop so that job `waiting` fits (see the module docstring); [] when
    nothing needs stopping (what is already stopping makes room) or nothing would do."""
    room = {"CPU": free.get("CPU", 0.0), "GPU": free.get("GPU", 0.0)}
    for run in running:
        if run.stopping:
            room["CPU"] += run.cpus
            room["GPU"] += run.gpus
    if needs.fits(room):
        return []
    eligible = [
        run for run in running
        if not run.stopping and run.preemptible and run.priority < priority
        and run.ran_s >= min_run_s and run.last_preempted_for != waiting
    ]
    chosen = []
    for run in sorted(eligible, key=lambda r: (r.priority, r.ran_s)):
        chosen.append(run)
        room["CPU"] += run.cpus
        room["GPU"] += run.gpus
        if needs.fits(room):
            return chosen
    return []


def candidates(running: Iterable[Any], preempted_for: dict[str, str], now: float) -> list[Candidate]:
    """The dispatcher's running attempts (workers.dispatcher.Running) as the policy sees them."""
    return [
        Candidate(
            r.job_id, r.attempt, r.priority, r.preemptible, now - r.started, r.needs.cpus * r.needs.workers,
            r.needs.gpus * r.needs.workers, r.preempted_by is not None, preempted_for.get(r.job_id),
        )
        for r in running
    ]


def lowest_preemptible(running: Iterable[Any], now: float, min_run_s: float) -> int | None:
    """The lowest priority among attempts that could be preempted now (None: none can)."""
    eligible = [r.priority for r in running if r.preemptible and r.preempted_by is None and now - r.started >= min_run_s]
    return min(eligible, default=None)


def request(keys: Keys, job_id: str, attempt: int, by: str, priority: int) -> tuple[str, str]:
    """(key, value) of a preemption request, for the dispatcher to SET with REQUEST_TTL_S."""
    return keys.preempt_request(job_id), json.dumps({"attempt": attempt, "by": by, "priority": priority, "at": time.time()})


class Preemptor:
    """A dispatcher's preemptions: what it asked (`preempted_for`: job → the waiting job
    that last preempted it, kept until either starts or ends for good), and whether asking
    again can change anything. After a try that chose nobody, it is futile until its
    running attempts, their eligibility or the queue's priorities change: until then the
    dispatcher waits for capacity instead of taking the same message ten times a second."""

    def __init__(self, keys: Keys, min_run_s: float):
        self.keys, self.min_run_s = keys, min_run_s
        self.preempted_for: dict[str, str] = {}
        self._futile: tuple[Any, ...] | None = None

    def _signature(self, running: Iterable[Any], depth: dict[int, int], now: float) -> tuple[Any, ...]:
        eligible = frozenset((r.job_id, r.attempt, r.preempted_by is None and now - r.started >= self.min_run_s) for r in running)
        return eligible, tuple(sorted(depth.items()))

    def worth_trying(self, running: Sequence[Any], depth: dict[int, int]) -> bool:
        """The cluster is full: may a queued job (`depth`: the queue's) preempt one of ours?"""
        now = time.monotonic()
        lowest = lowest_preemptible(running, now, self.min_run_s)
        if lowest is None or not any(p > lowest and n for p, n in depth.items()):
            return False
        return self._signature(running, depth, now) != self._futile

    def choose_for(self, waiting: str, priority: int, needs: Needs, free: dict[str, float], running: Sequence[Any], depth: dict[int, int]) -> list[Candidate]:
        """The attempts to ask to stop for `waiting` (`choose`), remembered; none: futile."""
        now = time.monotonic()
        victims = choose(waiting, priority, needs, free, candidates(running, self.preempted_for, now), self.min_run_s)
        self._futile = None if victims else self._signature(running, depth, now)
        for victim in victims:
            self.preempted_for[victim.job_id] = waiting
        return victims

    def started(self, job_id: str) -> None:
        """`job_id` started: what it preempted may be preempted for it again some day."""
        for victim in [v for v, w in self.preempted_for.items() if w == job_id]:
            del self.preempted_for[victim]

    def ended(self, job_id: str) -> None:
        """`job_id`'s attempt ended, not handed back: nothing to remember of it."""
        self.preempted_for.pop(job_id, None)


class PreemptStop(Callback):
    """Stops the attempt at its next update once a dispatcher asked (see the docstring)."""

    def __init__(self, client: redis.Redis | None, keys: Keys, job_id: str, attempt: int, node_id: str | None = None):
        self.client, self.keys, self.job_id, self.attempt, self.node_id = client, keys, job_id, attempt, node_id
        self.by: dict[str, Any] | None = None
        self._polled = 0.0

    def stop_reason(self) -> str | None:
        if self.by is None and self.client is not None and time.monotonic() - self._polled >= POLL_S:
            self._polled = time.monotonic()
            self.by = self._read()
        return PREEMPTED if self.by is not None else None

    def _read(self) -> dict[str, Any] | None:
        """The request that ends this attempt: a dispatcher's for it, or its node's drain."""
        names = [self.keys.preempt_request(self.job_id)]
        if self.node_id is not None:
            names.append(self.keys.node_drain(self.node_id))
        try:
            request, *drain = self.client.mget(names)
        except redis.RedisError as exc:  # Redis away: no request can be seen; train on
            log.warning("job %s: preemption requests unreadable: %s", self.job_id, exc)
            return None
        found = json.loads(request) if request else None
        if found and found.get("attempt") == self.attempt:
            return found
        return json.loads(drain[0]) if drain and drain[0] else None

    def hand_back(self, reporter: Any, summary: Summary) -> Summary:
        """If the loop stopped for a preemption: write the last metrics, the checkpoint and
        the hand-back in one transaction (reporter: the attempt's workers.reporter.JobReporter).
        The attempt's finish, which comes next, is then refused as stale: the job is queued."""
        if summary.stopped != PREEMPTED or self.by is None:
            return summary
        if "node" in self.by:  # a drain (service/cli/node.py)
            cause = f"node {self.by['node']} drained ({self.by['reason']})"
        else:
            cause = f"preempted by job {self.by['by']} (priority {self.by['priority']})"
        reason = f"{cause}: handed back at step {summary.steps}"
        reporter.log(f"{reason}; it resumes from this checkpoint")

        def yield_slot(session: Any) -> None:
            states.requeue_lost(session, self.job_id, self.attempt, reason=reason, require_expired=False, counted=False)

        reporter.close(summary, then=yield_slot)
        return summary


def preemptible(config: dict[str, Any]) -> bool:
    """A stored job config that may be preempted: `preemptible` (absent in configs stored
    before it existed: true), and an attempt that watches for the request, which only a
    single-process training attempt does (workers/runner.py): a data-parallel group or an
    evaluation chosen would never hand back, and the waiting job would wait for its end."""
    resources = config.get("resources") or {}
    return bool(config.get("preemptible", True)) and config.get("kind", "train") == "train" and resources.get("workers", 1) == 1
