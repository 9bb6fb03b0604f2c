"""Every Redis key and pub/sub channel of unroll, named once (as arq's ``constants.py``).

Nothing else in the product spells a Redis key: code asks a ``Keys`` for it. All keys
start with a prefix (default ``unroll``) so that several deployments, or tests running at
the same time, can share one Redis without seeing each other; ``Keys(prefix).all_pattern``
matches everything one prefix owns (for cleanup).

Redis holds dispatch state only. Losing every key below loses no job: the database is the
source of truth and a reconciler re-enqueues the ``queued`` jobs that the queue lacks.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "unroll"


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or any(c.isspace() or c in "*?[]" for c in self.prefix):
            raise ValueError(f"Redis key prefix must be non-empty, without spaces or glob characters: {self.prefix!r}")

    # --- the dispatch queue (service.store.queue) --------------------------------------------
    # ZSET of waiting messages. Score: -priority (lowest score pops first, so the highest
    # priority wins); member: "<16 hex digits of a sequence number>:<job id>", so members of
    # one score sort by enqueue order (Redis orders equal scores lexicographically).
    @property
    def queue_pending(self) -> str:
        return f"{self.prefix}:queue:pending"

    # ZSET of delivered, unacknowledged messages. Member: job id; score: the lease deadline
    # in milliseconds of the Redis server's clock (TIME), so consumers' clocks do not matter.
    @property
    def queue_in_flight(self) -> str:
        return f"{self.prefix}:queue:in_flight"

    # HASH job id -> the consumer holding its lease (only while in flight).
    @property
    def queue_owners(self) -> str:
        return f"{self.prefix}:queue:owners"

    # HASH job id -> its pending member (see queue_pending), for every job the queue holds,
    # pending or in flight: a reclaimed message goes back with its original place in line.
    # Its fields are the queue's membership: `contains` is one HEXISTS.
    @property
    def queue_members(self) -> str:
        return f"{self.prefix}:queue:members"

    # HASH job id -> priority as a decimal string (exact), for every job the queue holds.
    @property
    def queue_priorities(self) -> str:
        return f"{self.prefix}:queue:priorities"

    # HASH priority -> number of pending messages of that priority (fields at 0 are deleted).
    @property
    def queue_depth(self) -> str:
        return f"{self.prefix}:queue:depth"

    # STRING counter: the sequence number of the next pending member.
    @property
    def queue_sequence(self) -> str:
        return f"{self.prefix}:queue:sequence"

    # LIST of wake-up tokens: a token is pushed for each message made available, and a
    # waiting consumer BLPOPs it, then pops the pending ZSET atomically. Bounded (LTRIM).
    @property
    def queue_wakeup(self) -> str:
        return f"{self.prefix}:queue:wakeup"

    # SET of the projects that have pending messages (a project whose pending ZSET is found
    # empty is removed lazily by the dequeue script).
    @property
    def queue_projects(self) -> str:
        return f"{self.prefix}:queue:projects"

    # HASH job id -> its project id, for every job the queue holds.
    @property
    def queue_project_of(self) -> str:
        return f"{self.prefix}:queue:project_of"

    # ZSETs, one per project, of that project's pending members (same members and scores
    # as queue_pending): the key is this prefix followed by the project id. Dequeue picks
    # among the heads of these (fair share between projects, service.store.queue).
    @property
    def queue_project_pending_prefix(self) -> str:
        return f"{self.prefix}:queue:pending:project:"

    def queue_project_pending(self, project_id: str) -> str:
        return f"{self.queue_project_pending_prefix}{project_id}"

    @property
    def queue_keys(self) -> list[str]:
        """Every key of the queue, in the order its Lua scripts expect them as KEYS."""
        return [
            self.queue_pending,
            self.queue_in_flight,
            self.queue_owners,
            self.queue_members,
            self.queue_priorities,
            self.queue_depth,
            self.queue_sequence,
            self.queue_wakeup,
            self.queue_projects,
            self.queue_project_of,
            # Not a key: the prefix of the per-project ZSETs, which the scripts name from it.
            self.queue_project_pending_prefix,
        ]

    # --- live events (service.store.events) ----------------------------------------------------
    # STREAM of one job's events, one entry each (field "event": its JSON), for the API's
    # Server-Sent Events; entry ids are the events' SSE ids. Trimmed to about
    # events.STREAM_LENGTH entries; expires events.ENDED_TTL_S after the job's final state
    # (events.LIVE_TTL_S after its last event otherwise).
    def job_events(self, job_id: str) -> str:
        return f"{self.prefix}:events:job:{job_id}"

    # --- tokens (service.store.revocations) -----------------------------------------------
    # Pub/sub channel: the sha256 of each token revoked, so every API process forgets it at
    # once instead of trusting its cache until the entry expires.
    @property
    def token_revocations(self) -> str:
        return f"{self.prefix}:tokens:revoked"

    # --- dispatchers (workers.dispatcher) ---------------------------------------------------
    # STRING (JSON, with a TTL) that a live dispatcher refreshes every second: its Ray
    # status, for /readyz. No key left: no dispatcher is alive.
    def dispatcher_heartbeat(self, name: str) -> str:
        return f"{self.prefix}:dispatchers:{name}"

    @property
    def dispatcher_heartbeats(self) -> str:
        """A SCAN pattern matching every dispatcher's heartbeat."""
        return f"{self.prefix}:dispatchers:*"

    # STRING (JSON {"attempt", "by", "priority", "at"}, with a TTL): a dispatcher asks this
    # job's running attempt to stop at its next update and hand its slot to job `by`
    # (workers.preemption). Lost: the waiting job waits for a slot as before.
    def preempt_request(self, job_id: str) -> str:
        return f"{self.prefix}:preempt:{job_id}"

    # STRING (JSON {"node", "reason", "at"}, with a TTL): `unroll node drain` takes this Ray
    # node (its hex id) out for maintenance; the attempts running there hand their slot back
    # at their next update, like a preemption (workers.preemption), and move to other nodes.
    # Lost: they train on where they are until the node leaves.
    def node_drain(self, node_id: str) -> str:
        return f"{self.prefix}:drain:{node_id}"

    # --- inference sessions (service.store.model_sessions) -------------------------------
    # HASH of one session: project, job, step, sha256 (the checkpoint it runs), state (the
    # serialized hidden state; empty: a fresh one). Expires UNROLL_SESSION_TTL_S after its
    # last use.
    def model_session(self, session_id: str) -> str:
        return f"{self.prefix}:inference:session:{session_id}"

    # STRING lock of one session (a random token, with a TTL) held while a step runs, so
    # that two steps of one session never interleave.
    def model_session_lock(self, session_id: str) -> str:
        return f"{self.prefix}:inference:lock:{session_id}"

    # ZSET of one project's sessions: member the session id, score its expiry in ms; the
    # live ones count against UNROLL_MAX_SESSIONS_PER_PROJECT.
    def project_model_sessions(self, project_id: str) -> str:
        return f"{self.prefix}:inference:project:{project_id}"

    # --- housekeeping ----------------------------------------------------------------------
    @property
    def all_pattern(self) -> str:
        """A SCAN/KEYS pattern matching every key of this prefix."""
        return f"{self.prefix}:*"
