"""A sweep trial's attempt stops at its next rung (service.store.early_stop).

The trial trains with its own config, unchanged (its schedule spans train.max_steps); this
callback ends the attempt once the update at the rung's step, its evaluation and its
checkpoint are done: the loop stops with `stopped = "early"` and checkpoints there, and
the attempt ends succeeded. At the top rung (early_stop.max_steps, when it lies below
train.max_steps) the trial is done: it stops with `stopped = "budget"` and, as a completed
run does, stores its model. With the sweep's `target`, an evaluation whose metric reaches
it ends the trial at that step, done as well (`stopped = "target"`, model stored). Whether
a paused trial goes on is decided in the transaction that ends its attempt
(service.store.db.early_stop.advance, from workers.attempt; the dispatcher and its
reconciler decide again when that was missed); a resumed attempt starts at the rung and
stops at the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from service.store import asha
from service.store.db import early_stop, repo
from service.store.early_stop import BUDGET, PAUSED, TARGET, reached
from trainer.loop import Callback


class RungStop(Callback):
    def __init__(self, ladder: Sequence[int], log: Callable[[str], None], settings: Mapping[str, Any] | None = None):
        self.ladder = tuple(ladder)
        self.log = log
        self.stop_at = self.ladder[-1]
        self.step = 0
        self.settings = settings or {}  # the sweep's early_stop: its metric, goal and target
        self.reached: tuple[int, float] | None = None  # (step, value) of the evaluation that reached the target

    def on_start(self, info: dict[str, Any]) -> None:
        self.step = info["start_step"]
        self.stop_at = asha.stop_step(self.ladder, self.step)
        self.log(f"early_stop: this attempt stops at rung {self.stop_at} (rungs {', '.join(map(str, self.ladder))})")

    def on_update(self, step: int, metrics: dict[str, float | None]) -> None:
        self.step = step

    def on_eval(self, step: int, metrics: dict[str, float | None]) -> None:
        target, metric = self.settings.get("target"), self.settings.get("metric")
        if target is not None and reached(metrics.get(metric), target, self.settings["goal"]):
            self.reached = (step, metrics[metric])

    def stop_reason(self) -> str | None:
        if self.reached is not None:
            step, value = self.reached
            self.log(f"early_stop: {self.settings['metric']} = {value:.4g} at step {step} reached the target {self.settings['target']:g}: done")
            return TARGET
        if self.step < self.stop_at:
            return None
        if self.stop_at == self.ladder[-1]:  # early_stop.max_steps, below train.max_steps
            self.log(f"early_stop: reached the top rung {self.stop_at}: the trial's budget in this sweep")
            return BUDGET
        self.log(f"early_stop: reached rung {self.stop_at}; paused there for the sweep's decision")
        return PAUSED


def rung_stops(attempt: Any, job_id: str, log: Callable[[str], None]) -> list[Callback]:
    """[RungStop] for a trial of a sweep that stops early, else []. `attempt` is the
    attempt's workers.reporter.Attempt (its database sessions)."""
    with attempt.sessions.begin() as session:
        job = repo.get_job(session, job_id)
        rule = early_stop.rule(session, job)
    return [] if rule is None else [RungStop(rule[0], log, rule[1])]
