"""`unroll worker`: take queued jobs, claim them, and run each as a Ray task.

The loop, per message from the Redis queue:

1. the job must still be queued and due (else the message is dropped: the database
   decides, the queue only delivers);
2. its sweep, if any, must run fewer than `max_parallel` jobs (else it waits; two
   dispatchers racing may exceed the limit by one for a moment);
3. some node of the cluster must be able to hold what the job asks for (`resources.cpus`,
   `resources.gpus`); if none ever can, the job stays queued with a `pending_reason`
   that users see, instead of failing or hiding;
4. the resources must be free now; if not, the message goes back to the queue with its
   priority and the dispatcher waits for a running job to end;
5. the job is claimed in the database (queued → running, attempt + 1, a lease) — a
   conditional UPDATE, so of several dispatchers exactly one wins;
6. it runs as one Ray task with exactly those resources (`workers.runner.run_attempt`).

Beside it, a maintenance loop: expired leases (a lost worker, actor or node) send their
jobs back to the queue with attempt + 1 and a backoff, or fail them when the attempts are
used up; a reconciler re-enqueues every due queued job that the queue does not hold (after
a Redis flush or restart); cancel requests an attempt ignores past a grace period are
enforced by killing its task; and a heartbeat in Redis tells `/readyz` that Ray answers.

Every transition the dispatcher commits reaches the job's event stream from its sessions'
outbox (service.store.db.outbox), a claim before its attempt starts.

Why Ray tasks, not one actor per job: a job needs no state between calls, and Ray reuses
a task's worker process, which keeps torch and the engine imported; creating an actor
costs a fresh process (2–3 s here), which would cap throughput at well under one tiny job
per second per core. GPU tasks get a fresh process per attempt (`max_calls=1`: frees GPU
memory; a reused process's CUDA would number the GPUs of an earlier task). Fate-sharing is the same: if the
dispatcher dies, Ray ends the tasks it owns, their leases expire, and another dispatcher
resumes the jobs from their checkpoints.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from workers.ray_auth import use_ray_token

use_ray_token()  # before `import ray`: Ray reads RAY_AUTH_MODE when it is imported

import ray  # noqa: E402
import redis
import redis.asyncio as aioredis
from sqlalchemy.orm import Session, sessionmaker

from service.store import events
from service.store.db import early_stop, outbox, repo, states
from service.store.db.base import utcnow
from service.store.db.errors import DatabaseUnavailable, NotFound
from service.store.db.models import JobState
from service.store.db.session import make_engine
from service.store.keys import Keys
from service.store.queue import JobQueue
from service.store.settings import Settings, get_settings
from trainer.config import parse_config
from workers.attempt import AttemptSpec
from workers.fairness import FairShare
from workers.metrics import DispatcherMetrics
from workers import preemption
from workers.placement import ClusterView, Needs, node_totals
from workers.runner import run_attempt, warm_up

log = logging.getLogger("unroll.dispatcher")

MAINTENANCE_EVERY_S = 1.0
RECONCILE_EVERY_S = 5.0
HEARTBEAT_TTL_S = 15
# How long after one of our tasks ended Ray may still count its resources as taken
# (raylets report to the GCS every 100 ms by default).
RAY_RELEASE_LAG_S = 0.25
CLUSTER_VIEW_TTL_S = 1.0


@dataclass
class Running:
    job_id: str
    attempt: int
    ref: Any
    needs: Needs
    started: float = field(default_factory=time.monotonic)
    priority: int = 0
    project_id: str = ""
    preemptible: bool = True
    preempted_by: str | None = None  # the waiting job this attempt was asked to stop for


def _run_on_ray(spec: AttemptSpec) -> str:
    return run_attempt(spec)


def _run_on_ray_gpu(spec: AttemptSpec) -> str:
    """The same, declared with max_calls=1 (which `.options()` cannot set)."""
    return run_attempt(spec)


def backoff_seconds(settings: Settings, attempt: int) -> float:
    """Exponential backoff after a lost attempt: base, 2·base, 4·base, ... at most 5 min."""
    return min(300.0, settings.retry_backoff_seconds * 2 ** max(0, attempt - 1))


class Dispatcher:
    def __init__(self, settings: Settings | None = None, *, name: str | None = None):
        self.settings = settings or get_settings()
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.prefix = prefix = self.settings.redis_prefix
        self.keys = Keys(prefix)
        # Every transition this process commits is published to its job's event stream at
        # commit (service.store.db.outbox), from the thread that committed it.
        self.events_redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
        publisher = events.Publisher(self.events_redis, prefix)
        self.sessions: sessionmaker[Session] = sessionmaker(
            make_engine(self.settings.database_url), expire_on_commit=False, info=outbox.publishing(publisher)
        )
        self.redis = aioredis.Redis.from_url(self.settings.redis_url)
        self.queue = JobQueue(self.redis, prefix)
        self.running: dict[str, Running] = {}
        self.pending_reasons: dict[str, tuple[int, str | None]] = {}
        self._capacity = asyncio.Event()
        self._remote: Any = None
        self._last_reconcile = 0.0
        # (monotonic time, CPUs, GPUs) of our tasks that ended lately (see free())
        self._released: collections.deque[tuple[float, float, float]] = collections.deque()
        self._cluster_view = ClusterView([], {}, 0.0)
        self.metrics = DispatcherMetrics()
        self.fair = FairShare(self.db)
        self.preemptor = preemption.Preemptor(self.keys, self.settings.min_run_s)

    # -- plumbing -----------------------------------------------------------------------

    async def db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a repository function in one transaction, off the event loop."""

        def call() -> Any:
            with self.sessions.begin() as session:
                return fn(session, *args, **kwargs)

        return await asyncio.to_thread(call)

    def _connect_ray(self) -> None:
        if not ray.is_initialized():
            ray.init(
                address=self.settings.ray_address or None,
                namespace="unroll",
                log_to_driver=False,
                include_dashboard=False if not self.settings.ray_address else None,
                runtime_env={"worker_process_setup_hook": warm_up},
            )
        self._remote = ray.remote(max_retries=0, retry_exceptions=False)(_run_on_ray)
        self._remote_gpu = ray.remote(max_retries=0, retry_exceptions=False, max_calls=1)(_run_on_ray_gpu)

    # -- the loops ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.to_thread(self._connect_ray)
        log.info("dispatcher %s ready: ray %s", self.name, await asyncio.to_thread(ray.cluster_resources))
        tasks = [asyncio.create_task(self._dispatch_loop(stop)), asyncio.create_task(self._maintenance_loop(stop))]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._hand_back()
        await self.redis.delete(self.keys.dispatcher_heartbeat(self.name))
        await self.redis.aclose()
        self.events_redis.close()

    async def _dispatch_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                full = not (await self.free()).get("CPU", 0.0) > 1e-9 and self.running
                if full and not self.preemptor.worth_trying(list(self.running.values()), await self.queue.depth()):
                    await self._wait_for_capacity()  # nothing could start: take no message
                    continue
                await self.fair.refresh((await asyncio.to_thread(self._cluster)).totals)
                holding = self.fair.holding()
                job_id = await self.queue.dequeue(
                    self.name,
                    lease_s=self.settings.lease_seconds,
                    # While projects are held back, look again soon: one of their jobs may end.
                    block_s=0.25 if holding else 1.0,
                    shares=self.fair.shares,
                    held=holding,
                )
                if job_id is not None:
                    await self.place_or_fail(job_id)
            except asyncio.CancelledError:
                raise
            except (DatabaseUnavailable, aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
                log.warning("dispatch paused, a dependency is down: %s", exc)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("dispatch failed")
                await asyncio.sleep(1.0)

    async def _maintenance_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.maintain()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("maintenance failed: %s", exc)
            await asyncio.sleep(MAINTENANCE_EVERY_S)

    # -- placing one job ------------------------------------------------------------------

    async def place_or_fail(self, job_id: str) -> None:
        """Place one job; if placing it raises (a job no code path foresaw: a stored config
        this version refuses, resources no arithmetic can hold), the job fails with that
        error and leaves the queue. Only an unreachable database or Redis pauses dispatch:
        then the job is not at fault."""
        try:
            await self.place(job_id)
        except (asyncio.CancelledError, DatabaseUnavailable, aioredis.ConnectionError, aioredis.TimeoutError, OSError):
            raise
        except Exception as exc:
            log.exception("job %s cannot be placed; it fails", job_id)
            await self.db(states.fail_unplaceable, job_id, f"could not be placed: {_short(exc)}")
            await self.queue.ack(job_id, self.name)

    async def place(self, job_id: str) -> None:
        try:
            job = await self.db(_brief, job_id)
        except NotFound:
            await self.queue.ack(job_id, self.name)
            return
        if not job["claimable"]:
            await self.queue.ack(job_id, self.name)  # not runnable now; the reconciler re-offers it when due
            return
        if job["sweep_full"]:
            await self._set_reason(job_id, job["attempt"], f"its sweep already runs max_parallel={job['sweep_full']} jobs")
            await self.queue.release(job_id, self.name, job["priority"])
            await self._wait_for_capacity()
            return
        needs = job["needs"]
        cpus, gpus = needs.cpus * needs.workers, needs.gpus * needs.workers
        over = self.fair.check(job["project_id"], cpus, gpus)
        if over is not None:  # its project is back in the queue's choice after the next read
            await self._set_reason(job_id, job["attempt"], over)
            await self.queue.release(job_id, self.name, job["priority"])
            return
        totals = (await asyncio.to_thread(self._cluster)).nodes
        if not needs.fits_nodes(totals):
            biggest = max(totals, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
            await self._set_reason(job_id, job["attempt"], f"no node can hold {needs.describe()} (largest node: {biggest.get('CPU', 0):g} CPU, {biggest.get('GPU', 0):g} GPU)")
            await self.queue.ack(job_id, self.name)
            return
        if not needs.fits(free := await self.free()) or not await asyncio.to_thread(needs.reserve):
            await self._preempt_for(job_id, job["priority"], needs, free)
            await self._set_reason(job_id, job["attempt"], f"waiting for {needs.describe()} to be free")
            await self.queue.release(job_id, self.name, job["priority"])
            await self._wait_for_capacity()
            return
        attempt = await self.db(states.claim, job_id, self.name, self.settings.lease_seconds)
        if attempt is None:  # another dispatcher won, or it was cancelled meanwhile
            await self.queue.ack(job_id, self.name)
            return
        self.pending_reasons.pop(job_id, None)
        self.preemptor.started(job_id)
        self.fair.started(job["project_id"], cpus, gpus)
        spec = AttemptSpec(
            job_id=job_id, attempt=attempt, worker=self.name, database_url=self.settings.database_url,
            redis_url=self.settings.redis_url, artifacts=self.settings.artifacts,
            lease_seconds=float(self.settings.lease_seconds), prefix=self.prefix, max_params=self.settings.max_params,
        )
        # A group's ranks hold its resources (Ray Train's placement group); its driver none.
        solo = needs.workers == 1
        options = {"num_cpus": needs.cpus if solo else 0, "num_gpus": needs.gpus if solo else 0, "name": f"{job_id}-a{attempt}"}
        remote = self._remote_gpu if needs.gpus > 0 else self._remote
        ref = remote.options(**options).remote(spec)
        self.running[job_id] = Running(job_id, attempt, ref, needs, priority=job["priority"], project_id=job["project_id"], preemptible=job["preemptible"])
        await self.queue.ack(job_id, self.name)
        self.metrics.attempts_started.inc()
        if job["attempt"] == 0:
            self.metrics.dispatch_latency.observe(max(0.0, (utcnow() - job["created_at"]).total_seconds()))
        log.info("job %s attempt %d started (%s)", job_id, attempt, needs.describe(), extra=_ctx(job_id, attempt, self.name))
        asyncio.create_task(self._watch(self.running[job_id]))

    async def free(self) -> dict[str, float]:
        """Resources free for a new task. Ray's own count lags behind the tasks we just
        submitted, so what our running tasks hold is subtracted from the cluster's total
        too, and the smaller of the two is taken (other dispatchers show up in Ray's)."""
        available, total = await asyncio.to_thread(lambda: (ray.available_resources(), self._cluster().totals))
        runs = self.running.values()
        ours = {"CPU": sum(r.needs.cpus * r.needs.workers for r in runs), "GPU": sum(r.needs.gpus * r.needs.workers for r in runs)}
        unused = {k: total.get(k, 0.0) - ours[k] for k in ("CPU", "GPU")}  # by our own count
        # Ray's count reaches the GCS up to ~100 ms after a task ends (its raylets report
        # periodically): what our own tasks gave back within RAY_RELEASE_LAG_S is credited,
        # or a slot stayed idle that long per job. Where Ray had already counted it, this
        # over-offers at most what we just released, for that moment (Ray then queues the
        # task briefly).
        now = time.monotonic()
        while self._released and now - self._released[0][0] > RAY_RELEASE_LAG_S:
            self._released.popleft()
        credit = {"CPU": sum(r[1] for r in self._released), "GPU": sum(r[2] for r in self._released)}
        return {k: min(available.get(k, 0.0) + credit[k], unused[k]) for k in unused}

    async def _wait_for_capacity(self, timeout: float = 0.1) -> None:
        """Until one of our tasks ends, or `timeout` (other dispatchers' tasks end unseen)."""
        self._capacity.clear()
        try:
            await asyncio.wait_for(self._capacity.wait(), timeout=timeout)
        except TimeoutError:
            pass

    def _cluster(self) -> ClusterView:
        """The nodes and the cluster's total resources, asked of Ray at most once per
        CLUSTER_VIEW_TTL_S (they change when nodes come and go, not per job)."""
        view = self._cluster_view
        if time.monotonic() - view.at > CLUSTER_VIEW_TTL_S:
            view = self._cluster_view = ClusterView(node_totals(), ray.cluster_resources(), time.monotonic())
        return view

    async def _set_reason(self, job_id: str, attempt: int, reason: str | None) -> None:
        if self.pending_reasons.get(job_id) != (attempt, reason):  # written once per attempt number
            self.pending_reasons[job_id] = (attempt, reason)
            await self.db(repo.set_pending_reason, job_id, reason)

    async def _watch(self, run: Running) -> None:
        try:
            outcome = await run.ref
            log.info("job %s attempt %d ended: %s", run.job_id, run.attempt, outcome, extra=_ctx(run.job_id, run.attempt, self.name))
            if run.preempted_by is not None:  # handed back (workers.preemption): queue it at once
                await self.redis.delete(self.keys.preempt_request(run.job_id))
                await self.queue.enqueue(run.job_id, run.priority, run.project_id)
        except asyncio.CancelledError:
            raise
        except ray.exceptions.TaskCancelledError:
            await self.db(states.finish, run.job_id, run.attempt, JobState.CANCELLED, "cancelled: the attempt ignored the request and was stopped")
        except Exception as exc:  # the task crashed, its worker died, or its node is gone
            reason = _short(exc)
            log.warning("job %s attempt %d lost: %s", run.job_id, run.attempt, reason, extra=_ctx(run.job_id, run.attempt, self.name))
            await self._requeue(run.job_id, run.attempt, reason, require_expired=False)
        finally:
            self.running.pop(run.job_id, None)
            if run.preempted_by is None:
                self.preemptor.ended(run.job_id)
            self._released.append((time.monotonic(), run.needs.cpus * run.needs.workers, run.needs.gpus * run.needs.workers))
            self.fair.stale()
            self._capacity.set()
        await self._advance_sweep(run.job_id)  # whatever the outcome: it may settle its sweep

    async def _preempt_for(self, waiting: str, priority: int, needs: Needs, free: dict[str, float]) -> None:
        """Ask running attempts of lower priority to make room for `waiting` (workers.preemption)."""
        for victim in self.preemptor.choose_for(waiting, priority, needs, free, list(self.running.values()), await self.queue.depth()):
            key, value = preemption.request(self.keys, victim.job_id, victim.attempt, waiting, priority)
            await self.redis.set(key, value, ex=preemption.REQUEST_TTL_S)
            self.running[victim.job_id].preempted_by = waiting
            self.metrics.preemptions.inc()
            log.info("job %s attempt %d preempted by job %s (priority %d > %d)", victim.job_id, victim.attempt, waiting, priority, victim.priority, extra=_ctx(victim.job_id, victim.attempt, self.name))

    async def _advance_sweep(self, key: str, decide: Callable[[Session, str], list] = early_stop.advance) -> None:
        """A sweep trial's attempt ended (job `key`), or an unsettled sweep's decision was
        missed (sweep `key`, early_stop.decide): its early stopping decides
        (service.store.db.early_stop); the queue gets at once the trials it resumed."""
        try:
            due = await self.db(decide, key)
            added = await self.queue.enqueue_many(due) if due else []
        except Exception as exc:  # noqa: BLE001 - the worker decided already, the reconciler decides again
            log.warning("early stopping of the sweep of %s not advanced: %s", key, exc)
            return
        for (promoted, _, _), new in zip(due, added):
            if new:
                log.info("job %s queued by its sweep's early stopping", promoted, extra=_ctx(promoted, 0, self.name))

    async def _requeue(self, job_id: str, attempt: int, reason: str, *, require_expired: bool) -> JobState | None:
        delay = backoff_seconds(self.settings, attempt)
        # Due jobs reach the queue through the reconciler once their backoff has passed.
        state = await self.db(states.requeue_lost, job_id, attempt, reason=reason, backoff_seconds=delay, require_expired=require_expired)
        if state is None:
            return None
        if state == JobState.QUEUED:
            self.metrics.retries.labels("lease_expired" if require_expired else "attempt_lost").inc()
        log.info("job %s attempt %d: %s -> %s (retry after %.1fs)", job_id, attempt, reason, state.value, delay, extra=_ctx(job_id, attempt, self.name))
        return state

    # -- maintenance ------------------------------------------------------------------------

    async def maintain(self) -> None:
        await self.queue.reclaim_expired()
        # Leases of our own tasks are renewed here too, so a task Ray has not started yet
        # (waiting for a node) is not taken for lost; a started one renews its own.
        for run in list(self.running.values()):
            if await self.db(states.renew_lease, run.job_id, run.attempt, self.name, self.settings.lease_seconds):
                self.metrics.lease_renewals.inc()
        for lease in await self.db(states.expired_leases):
            if await self._requeue(lease.job_id, lease.attempt, "worker lost: lease expired", require_expired=True):
                self.metrics.lease_expiries.inc()
        for job_id, attempt in await self.db(repo.cancel_overdue, list(self.running), grace_seconds=self.settings.cancel_grace_seconds):
            run = self.running.get(job_id)
            if run is not None and run.attempt == attempt:
                log.warning("job %s attempt %d ignored its cancel request: stopping it", job_id, attempt)
                ray.cancel(run.ref, force=True)
        if time.monotonic() - self._last_reconcile >= RECONCILE_EVERY_S:
            self._last_reconcile = time.monotonic()
            await self.reconcile()
            self.fair.resay()
        await self.fair.refresh((await asyncio.to_thread(self._cluster)).totals)  # also when full
        await self._heartbeat()

    async def reconcile(self) -> int:
        """Enqueue every due queued job that the queue does not hold; returns how many.
        First, early stopping decides for the sweeps whose decision was missed."""
        for sweep_id in await self.db(early_stop.unsettled):
            await self._advance_sweep(sweep_id, early_stop.decide)
        due = await self.db(repo.dispatchable_jobs)
        if not due:
            return 0
        held = await self.queue.contains_many([job[0] for job in due])
        missing = [job for job, has in zip(due, held) if not has]
        if missing:
            await self.queue.enqueue_many(missing)
            log.info("reconciler re-enqueued %d queued jobs", len(missing))
        return len(missing)

    async def _hand_back(self) -> None:
        """On a clean stop, the attempts we run go back to the queue at once instead of
        when their leases expire: Ray ends their tasks with this process, and the next
        dispatcher resumes them from their last checkpoint. (A hand-back does not count
        against the job's max_attempts: nothing failed.)"""
        for run in list(self.running.values()):
            try:
                state = await self.db(states.hand_back, run.job_id, run.attempt)
            except Exception as exc:  # noqa: BLE001 - its lease expires instead
                log.warning("job %s attempt %d not handed back (its lease will expire): %s", run.job_id, run.attempt, exc, extra=_ctx(run.job_id, run.attempt, self.name))
                continue
            if state is not None:
                log.info("job %s attempt %d handed back on stop: %s", run.job_id, run.attempt, state.value, extra=_ctx(run.job_id, run.attempt, self.name))

    async def _heartbeat(self) -> None:
        try:
            resources = await asyncio.to_thread(ray.cluster_resources)
            status = {"ray": "ok", "cluster": resources}
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            status = {"ray": f"unreachable: {_short(exc)}"}
        self.metrics.heartbeats.inc()
        status.update({"dispatcher": self.name, "running": len(self.running), "ts": time.time(), "metrics": self.metrics.snapshot()})
        await self.redis.set(self.keys.dispatcher_heartbeat(self.name), json.dumps(status), ex=HEARTBEAT_TTL_S)


def _brief(session: Session, job_id: str) -> dict[str, Any]:
    job, claimable = repo.get_job_if_claimable(session, job_id)
    sweep_full = 0  # a sweep's max_parallel, when that many of its jobs already run
    if claimable and job.sweep_id is not None:
        limit = repo.get_sweep(session, job.sweep_id).max_parallel
        if limit and repo.count_running_in_sweep(session, job.sweep_id) >= limit:
            sweep_full = limit
    return {
        "claimable": claimable,
        "sweep_full": sweep_full,
        "priority": job.priority,
        "project_id": job.project_id,
        # The stored config was validated at submission: its typed resources, with the
        # trainer's own defaults, say what the attempt reserves.
        "needs": Needs.of(parse_config(job.config).resources) if claimable else None,
        "attempt": job.attempt,  # a claim raises it: a reason said before is gone (claims clear it)
        "created_at": job.created_at,
        "preemptible": preemption.preemptible(job.config),
    }


def _ctx(job_id: str, attempt: int, worker: str) -> dict[str, Any]:
    """The fields of a structured log line about one attempt (service.store.logs)."""
    return {"job_id": job_id, "attempt": attempt, "worker": worker}


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:500]


def main() -> int:
    """`unroll worker`: run a dispatcher until SIGINT or SIGTERM."""
    from service.store.logs import configure_logging

    configure_logging()
    settings = get_settings()

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Dispatcher(settings).run(stop)

    asyncio.run(serve())
    return 0
if __name__ == "__main__":
    raise SystemExit(main())
