"""Trainer callbacks → the database, the artifact store and live events, for one attempt.

Nothing here runs in the training loop's hot path but appending to a buffer: a background
thread flushes metrics and log lines in batches (every second, and at the end), records
progress, renews the attempt's lease, writes checkpoints, and polls for cancellation.
Every write is fenced by the attempt number; the first refused write marks the attempt
stale and stops it, and from then on it writes nothing at all.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import redis
from sqlalchemy.orm import Session, sessionmaker

from service.store import events
from service.store.artifacts import ArtifactStore, Stored
from service.store.db import repo, states
from service.store.db.errors import StaleAttempt
from service.store.keys import Keys
from trainer import checkpoint as ckpt
from trainer.loop import Callback, Summary

log = logging.getLogger("unroll.worker")

FLUSH_EVERY_S = 1.0
CANCEL_POLL_S = 0.25
LOG_PROGRESS_EVERY_S = 10.0


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

    def publish(self, event: dict[str, Any]) -> None:
        """Best effort: events are a live view; the database holds the record."""
        if self.redis is None:
            return
        try:
            self.redis.publish(Keys(self.prefix).job_events(self.job_id), events.encode(self.job_id, event))
        except redis.RedisError as exc:
            log.debug("event not published: %s", exc)


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
        self._step = 0
        self._last_loss: float | None = None
        self._last_progress_log = 0.0
        self.cancel_requested = False
        self.stale = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reporter-{attempt.job_id}", daemon=True)
        self._thread.start()

    # -- callbacks (training thread: buffer only) ----------------------------------------

    def on_start(self, info: dict[str, Any]) -> None:
        self.max_steps = info["total_steps"]
        self._step = info["start_step"]
        resumed = f", resuming at step {info['start_step']}" if info["start_step"] else ""
        self.log(f"attempt {self.attempt.number} on {self.attempt.worker}: {info['parameters']:,} parameters on {info['device']}{resumed}")

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

    def should_stop(self) -> bool:
        return self.cancel_requested or self.stale

    def log(self, line: str, level: str = "info") -> None:
        with self._lock:
            self._lines.append(repo.LogLine(line, level))

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
            with a.sessions.begin() as session:
                if states.is_cancel_requested(session, a.job_id, a.number) and not self.cancel_requested:
                    self.cancel_requested = True
                    self.log("cancel requested: stopping after this window")
        except StaleAttempt:
            self._mark_stale()

    def _renew(self) -> None:
        a = self.attempt
        with a.sessions.begin() as session:
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
        try:
            # Files first (named by attempt, so a refused or failed transaction leaves only
            # an unreferenced file); the database records them with the metrics.
            stored = [(step_, self._store_checkpoint(step_, state)) for step_, state in checkpoints]
            with a.sessions.begin() as session:
                if points:
                    repo.insert_metrics(session, a.job_id, a.number, points)
                if lines:
                    repo.append_logs(session, a.job_id, a.number, lines)
                if not states.update_progress(session, a.job_id, a.number, step):
                    raise StaleAttempt(a.job_id, a.number)
                for step_, file in stored:
                    repo.add_checkpoint(session, a.job_id, a.number, step=step_, uri=file.uri, bytes=file.bytes, sha256=file.sha256)
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
        if points:
            progress = step / self.max_steps if self.max_steps else None
            a.publish({"type": "progress", "step": step, "max_steps": self.max_steps, "progress": progress, "loss": self._last_loss})

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

