"""Trainer callbacks → the database, the artifact store and live events, for one attempt.

Nothing here runs in the training loop's hot path but appending to a buffer: a background
thread flushes metrics and log lines in batches (every second, and at the end), records
progress, renews the attempt's lease, writes checkpoints (deleting those past
`train.keep_checkpoints`), and polls for cancellation.
Every write is fenced by the attempt number; the first refused write marks the attempt
stale and stops it, and from then on it writes nothing at all.

Live events: each flush adds what it wrote to its transaction's outbox
(service.store.db.outbox), so they reach the job's event stream when it commits, and never
for a refused or failed write: `log` (the lines as stored), `metrics` (the latest value of
each series, at most one event every METRICS_EVENT_EVERY_S) and `progress`. The last flush
commits with the attempt's outcome, so its events come before the final `state` event.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import redis
import torch
from sqlalchemy.orm import Session, sessionmaker

from service.store import events
from service.store.artifacts import ArtifactStore, Stored
from service.store.db import outbox, repo, states
from service.store.db.base import utcnow
from service.store.db.errors import StaleAttempt
from trainer import checkpoint as ckpt
from trainer.loop import Callback, Summary

log = logging.getLogger("unroll.worker")

FLUSH_EVERY_S = 1.0
CANCEL_POLL_S = 0.25
LOG_PROGRESS_EVERY_S = 10.0
# Live events: at most one `metrics` event this often; at most this many lines per `log` event.
METRICS_EVENT_EVERY_S = 0.5
LOG_EVENT_LINES = 100


def current_node() -> str | None:
    """The Ray node this process runs on (hex id; a drain names it), None outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


@dataclass(frozen=True)
class Attempt:
    """Who is writing: one attempt of one job, and where its writes go."""

    job_id: str
    number: int
    worker: str
    sessions: sessionmaker[Session]
    store: ArtifactStore
    redis: redis.Redis | None
    prefix: str
    lease_seconds: float

    @cached_property
    def _outbox(self) -> dict[str, Any]:
        # One publisher per attempt (it remembers when Redis failed); none without Redis.
        return outbox.publishing(events.Publisher(self.redis, self.prefix)) if self.redis is not None else {}

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction whose events (the job's transitions, the flush's
        live events) are published to the job's event stream when it commits."""
        with self.sessions(info=self._outbox) as session, session.begin():
            yield session


class LiveMetrics:
    """What the next `metrics` event says: the latest point of each series since the last
    one, due at most every `every_s` (a flush may come every CANCEL_POLL_S while
    checkpoints are written) or at the attempt's end."""

    def __init__(self, every_s: float = METRICS_EVENT_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.clock = every_s, clock
        self._latest: dict[str, tuple[int, float | None]] = {}
        self._sent_at = -math.inf

    def add(self, points: Iterable[repo.MetricPoint]) -> None:
        for point in points:
            seen = self._latest.get(point.name)
            if seen is None or point.step >= seen[0]:
                self._latest[point.name] = (point.step, point.value)

    def due(self, final: bool = False) -> dict[str, Any] | None:
        """The event to send now, or None (nothing new, or the last one was too recent)."""
        if not self._latest or (not final and self.clock() - self._sent_at < self.every_s):
            return None
        return {
            "type": "metrics",
            "step": max(step for step, _ in self._latest.values()),
            "values": {name: value for name, (_, value) in self._latest.items()},
            "steps": {name: step for name, (step, _) in self._latest.items()},
        }

    def sent(self) -> None:
        self._latest.clear()
        self._sent_at = self.clock()


def gpu_identity(device: str) -> str:
    """Which GPU a CUDA device is, for the attempt's log: its name and UUID, as `nvidia-smi -L`
    shows them (an index alone depends on the process's CUDA_VISIBLE_DEVICES); "" on CPU."""
    if not device.startswith("cuda"):
        return ""
    props = torch.cuda.get_device_properties(device)
    return f" ({props.name}, GPU-{props.uuid})"


class AttemptStale(Exception):
    """Another attempt owns the job now; this one must stop and write nothing."""


class JobReporter(Callback):
    def __init__(self, attempt: Attempt, max_steps: int | None = None):
        self.attempt = attempt
        self.max_steps = max_steps
        self._lock = threading.Lock()
        self._points: list[repo.MetricPoint] = []
        self._lines: list[repo.LogLine] = []
        self._checkpoints: list[tuple[int, dict[str, Any]]] = []
        self.keep_checkpoints: int | None = None  # from the config, at the start (None: keep all)
        self._step = 0
        self._last_loss: float | None = None
        self._last_progress_log = 0.0
        self._live = LiveMetrics()
        self.cancel_requested = False
        self.stale = False
        self.model: dict[str, Any] | None = None  # the stored model artifact, once the run completed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reporter-{attempt.job_id}", daemon=True)
        self._thread.start()

    # -- callbacks (training thread: buffer only) ----------------------------------------

    def on_start(self, info: dict[str, Any]) -> None:
        self.max_steps = info["total_steps"]
        self.keep_checkpoints = info["config"]["train"]["keep_checkpoints"]
        self._step = info["start_step"]
        resumed = f", resuming at step {info['start_step']}" if info["start_step"] else ""
        node = current_node()
        where = f"{info['device']}{gpu_identity(info['device'])}, pid {os.getpid()}"  # for operators
        where += f", node {node[:12]}" if node else ""
        self.log(f"attempt {self.attempt.number} on {self.attempt.worker}: {info['parameters']:,} parameters on {where}{resumed}")

    def on_update(self, step: int, metrics: dict[str, float | None]) -> None:
        now = time.time()
        with self._lock:
            self._points.extend(repo.MetricPoint(name, step, value, now) for name, value in metrics.items())
            self._step = step
            if metrics.get("train/loss") is not None:
                self._last_loss = metrics["train/loss"]
        if now - self._last_progress_log >= LOG_PROGRESS_EVERY_S:
            self._last_progress_log = now
            loss = f"{self._last_loss:.4f}" if self._last_loss is not None else "-"
            self.log(f"step {step}/{self.max_steps} loss {loss}")

    def on_eval(self, step: int, metrics: dict[str, float | None]) -> None:
        now = time.time()
        with self._lock:
            self._points.extend(repo.MetricPoint(name, step, value, now) for name, value in metrics.items())
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if v is not None)
        self.log(f"eval @ {step}: {shown}")

    def on_checkpoint(self, step: int, checkpoint: dict[str, Any]) -> None:
        with self._lock:
            self._checkpoints.append((step, checkpoint))

    def on_model(self, artifact: dict[str, Any]) -> None:
        """Store a completed run's model at once (its record goes into the job's summary
        with the outcome: workers.attempt)."""
        a = self.attempt
        stored = a.store.put_bytes(a.store.model_uri(a.job_id, a.number), ckpt.to_bytes(artifact))
        self.model = {
            "uri": stored.uri, "bytes": stored.bytes, "sha256": stored.sha256, "step": artifact["step"],
            "selected": artifact["selected"], "valid_loss": artifact["valid_loss"],
        }

    def should_stop(self) -> bool:
        return self.cancel_requested or self.stale

    def log(self, line: str, level: str = "info") -> None:
        with self._lock:
            self._lines.append(repo.LogLine(line, level, utcnow()))  # its time as stored and as sent

    # -- the background thread ---------------------------------------------------------

    def _run(self) -> None:
        last_flush = last_renew = time.monotonic()
        while not self._stop.wait(CANCEL_POLL_S):
            try:
                self._poll_cancel()
                now = time.monotonic()
                if now - last_flush >= FLUSH_EVERY_S or self._checkpoints:
                    self.flush()
                    last_flush = now
                if now - last_renew >= self.attempt.lease_seconds / 3:
                    self._renew()
                    last_renew = now
            except AttemptStale:
                return
            except Exception as exc:  # the database may be briefly away: keep training, retry
                log.warning("job %s: report failed, will retry: %s", self.attempt.job_id, exc)

    def _poll_cancel(self) -> None:
        a = self.attempt
        try:
            with a.transaction() as session:
                if states.is_cancel_requested(session, a.job_id, a.number) and not self.cancel_requested:
                    self.cancel_requested = True
                    self.log("cancel requested: stopping after this window")
        except StaleAttempt:
            self._mark_stale()

    def _renew(self) -> None:
        a = self.attempt
        with a.transaction() as session:
            if not states.renew_lease(session, a.job_id, a.number, a.worker, a.lease_seconds):
                self._mark_stale()

    def _mark_stale(self) -> None:
        if not self.stale:
            log.warning("job %s attempt %s is stale: stopping without writing", self.attempt.job_id, self.attempt.number)
        self.stale = True
        raise AttemptStale()

    def flush(self, then: Callable[[Session], None] | None = None) -> None:
        """Write what is buffered in one transaction: metrics, log lines, progress and the
        records of any checkpoints (their files are stored first), and `then(session)`
        last, when given (the attempt's finish). Safe to call from any thread, one at a
        time."""
        if self.stale:
            raise AttemptStale()
        # One snapshot under the lock: a checkpoint is taken after its step's metrics were
        # buffered, and its record commits with them (never ahead of them: a checkpoint
        # recorded without its metrics would let a resumed attempt skip them for good).
        with self._lock:
            points, self._points = self._points, []
            lines, self._lines = self._lines, []
            checkpoints, self._checkpoints = self._checkpoints, []
            step = self._step
        a = self.attempt
        pruned: list[str] = []
        try:
            # Files first (named by attempt, so a refused or failed transaction leaves only
            # an unreferenced file); the database records them with the metrics.
            stored = [(step_, self._store_checkpoint(step_, state)) for step_, state in checkpoints]
            with a.transaction() as session:
                if points:
                    repo.insert_metrics(session, a.job_id, a.number, points)
                if lines:
                    repo.append_logs(session, a.job_id, a.number, lines)
                if not states.update_progress(session, a.job_id, a.number, step, max_steps=self.max_steps):
                    raise StaleAttempt(a.job_id, a.number)
                for step_, file in stored:
                    repo.add_checkpoint(session, a.job_id, a.number, step=step_, uri=file.uri, bytes=file.bytes, sha256=file.sha256)
                if stored and self.keep_checkpoints is not None:
                    pruned = repo.prune_checkpoints(session, a.job_id, self.keep_checkpoints)
                sends_metrics = self._announce(session, points, lines, step, final=then is not None)
                if then is not None:
                    then(session)
        except StaleAttempt:
            self._mark_stale()
        except Exception:
            with self._lock:  # the store or the database is away: keep them for the next try
                self._points[:0] = points
                self._lines[:0] = lines
                self._checkpoints[:0] = checkpoints
            raise
        # The records of pruned checkpoints are committed as gone: now their files.
        a.store.discard(pruned)
        if sends_metrics:
            self._live.sent()

    def _announce(self, session: Session, points: list[repo.MetricPoint], lines: list[repo.LogLine], step: int, final: bool) -> bool:
        """Add this flush's live events to its transaction's outbox (see the docstring).
        Returns whether a metrics event is among them."""
        a = self.attempt
        for i in range(0, len(lines), LOG_EVENT_LINES):
            shown = [
                {"ts": line.ts.isoformat() if line.ts else None, "level": line.level, "line": line.line}
                for line in lines[i : i + LOG_EVENT_LINES]
            ]
            outbox.add(session, a.job_id, {"type": "log", "attempt": a.number, "lines": shown})
        self._live.add(points)
        metrics = self._live.due(final)
        if metrics is not None:
            outbox.add(session, a.job_id, {**metrics, "attempt": a.number})
        if points:
            progress = step / self.max_steps if self.max_steps else None
            outbox.add(session, a.job_id, {"type": "progress", "attempt": a.number, "step": step, "max_steps": self.max_steps, "progress": progress, "loss": self._last_loss})
        return metrics is not None

    def _store_checkpoint(self, step: int, state: dict[str, Any]) -> Stored:
        a = self.attempt
        # The attempt is in the name: a zombie can never overwrite a live attempt's file.
        uri = a.store.checkpoint_uri(a.job_id, step, a.number)
        return a.store.put_bytes(uri, ckpt.to_bytes(state))

    def abandon(self) -> None:
        """Stop the thread and write nothing more (the attempt is stale)."""
        self._stop.set()
        self._thread.join()

    def close(self, summary: Summary | None = None, then: Callable[[Session], None] | None = None) -> None:
        """Stop the thread and write everything left, with `then(session)` in the same
        transaction (raises AttemptStale if refused)."""
        self.abandon()
        if summary is not None:
            now = time.time()
            with self._lock:
                self._points.append(repo.MetricPoint("system/peak_memory_bytes", summary.steps, float(summary.peak_memory_bytes), now))
                self._points.append(repo.MetricPoint("system/wall_s", summary.steps, summary.wall_s, now))
        self.flush(then)

