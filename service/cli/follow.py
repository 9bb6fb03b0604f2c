"""`unroll submit --wait`: a progress bar that follows one job until it ends.

It follows the job's event stream (``Client.follow``: a snapshot, then `state`, `progress`
and `metrics` events, reconnecting with Last-Event-ID after the server ends a stream), so
the bar moves as the job does, without polling. If the stream cannot be had (an API whose
Redis is away, a proxy that cuts long responses), it says so once and polls the job
instead. Either way it returns the job as the API has it at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from service.cli.common import TERMINAL
from service.cli.errors import ApiError

POLL_S = 1.0


class ProgressBar:
    """tqdm's bar (step / max_steps, ETA) with the job's state, latest loss and why it waits."""

    def __init__(self, job: dict[str, Any]) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=job.get("max_steps") or None, unit="step", dynamic_ncols=True, desc=job["id"], file=sys.stderr)
        self.postfix: dict[str, str] = {}
        self.show_job(job)

    def show_job(self, job: dict[str, Any]) -> None:
        """The whole job (a poll, or a stream's snapshot)."""
        loss = (job.get("metrics") or {}).get("train/loss") or {}
        self.show(state=job.get("state"), step=job.get("step"), max_steps=job.get("max_steps"),
                  loss=loss.get("value"), waiting=job.get("pending_reason") or "")

    def show_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "state" and event.get("snapshot"):
            self.show_job(event)
        elif kind == "state":
            self.show(state=event.get("state"), waiting="")
        elif kind == "progress":
            self.show(state="running", step=event.get("step"), max_steps=event.get("max_steps"), loss=event.get("loss"))
        elif kind == "metrics":
            self.show(loss=(event.get("values") or {}).get("train/loss"))

    def show(self, *, state: str | None = None, step: int | None = None, max_steps: int | None = None,
             loss: float | None = None, waiting: str | None = None) -> None:
        if max_steps and self.bar.total != max_steps:
            self.bar.total = max_steps
        if step is not None:
            self.bar.update(max(0, step - self.bar.n))
        if state is not None:
            self.postfix["state"] = state
        if loss is not None:
            self.postfix["loss"] = f"{loss:.4f}"
        if waiting is not None:
            self.postfix.pop("waiting", None)
            if waiting:
                self.postfix["waiting"] = waiting
        self.bar.set_postfix(self.postfix, refresh=True)

    def close(self) -> None:
        self.bar.close()


def follow_job(api: Any, job: dict[str, Any], interval: float = POLL_S) -> dict[str, Any]:
    """Show the job until it ends; returns it as it ended."""
    bar = ProgressBar(job)
    try:
        try:
            for event in api.follow(job["id"]):
                bar.show_event(event)
            return api.get(job["id"])
        except ApiError as exc:
            if exc.status in (401, 403, 404):
                raise
            print(f"\nlive events unavailable ({exc.message}); polling instead", file=sys.stderr)
        while True:
            job = api.get(job["id"])
            bar.show_job(job)
            if job["state"] in TERMINAL:
                return job
            time.sleep(interval)
    finally:
        bar.close()
