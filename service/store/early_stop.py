"""A sweep's early stopping: its settings, each trial's rungs, and what its summary shows.

The rule is service.store.asha (pure); this module (pure too) and service.store.db.early_stop
(the decisions in the database) apply it to a sweep's jobs:

- `settle` checks the body's `early_stop` against every job config of the sweep and fills
  in its defaults (the metric and goal of the task, max_steps from train.max_steps).
  Every rung must be a step where the trial evaluates (a multiple of train.eval_every, or
  its last step), so that the value judged is the value reached at the rung.
- A trial runs with its own, unchanged config (its learning-rate schedule spans its whole
  train.max_steps), and each attempt stops at the next rung above the step it starts
  from (`ladders`; workers.rungs stops it there). A trial that stops at a rung ends
  **succeeded with summary.stopped = "early"**, with a checkpoint at that step: it can be
  told from a failure, and from a trial that trained to its end ("completed"). A trial
  that reaches the top rung below its train.max_steps is done too: summary.stopped =
  "budget", with its model stored (trainer.loop.FINISHED); no rule resumes it. With
  `target`, a trial whose metric reaches it at an evaluation stops there, done as well:
  summary.stopped = "target", model stored, resolved (out of the rule's ranking, asha).
- `advance` (service.store.db.early_stop) runs after each attempt of a sweep's trial ends,
  in the transaction that ends it (workers.attempt; the dispatcher repeats it after any
  attempt, and its reconciler for sweeps whose decision was missed): it reads every
  trial's evaluations at its rungs and resumes (`resume`: succeeded, stopped early →
  queued, attempts counted afresh as after a retry) each paused trial the rule promotes
  now; with `resume: true` also, when nothing of the sweep is queued or running, the
  best paused trial of a bracket whose top rung no trial reached
  (asha.idle_resumptions). With `resume: false` only the trial that just arrived can go
  on (asha.continues_on_arrival); the others stay stopped for good. When it resumes
  nothing and no trial is queued or running, the sweep is settled (sweeps.settled_at):
  until then it reads running, never finished, even for the moment when every trial is
  paused. A resumed trial continues from its checkpoint at the rung: its losses are
  those of a trial that never stopped (the trainer resumes bit-exactly).
- `launch_order` shuffles the order in which the trials are queued: asynchronous
  successive halving assumes its trials arrive in random order (Li et al. 2020, §3: ASHA
  is random search with early stopping), and promotes the best of the few results a rung
  holds early on. Queued in grid order (increasing k1, say) the first trials at a rung are
  all of one end of the grid, and the best of them goes on whatever it is worth. The
  permutation is drawn from the base's train.seed, so a sweep submitted twice starts its
  trials in the same order; the jobs themselves (their ids, brackets and summary rows)
  stay in grid order.
- `annotate` adds to the summary's rows the rung each point reached, the steps its jobs
  trained and the steps saved against training every job to max_steps.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from service.store import asha
from service.store.sweeps import task_metric
from trainer.config import JobConfig, config_dict

PAUSED = "early"  # summary.stopped of a trial stopped at a rung
BUDGET = "budget"  # ... at the top rung, below its train.max_steps: done (trainer.loop.FINISHED)
TARGET = "target"  # ... at an evaluation that reached early_stop.target: done, resolved


def reached(value: float | None, target: float, goal: str) -> bool:
    """Does an evaluated `value` reach the sweep's target?"""
    if value is None or not math.isfinite(value):
        return False
    return value >= target if goal == "max" else value <= target


class InvalidEarlyStop(ValueError):
    """The sweep's early_stop cannot apply to its jobs; `field` names what to change."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def settle(early_stop: Mapping[str, Any], configs: Sequence[JobConfig]) -> dict[str, Any]:
    """The stored early_stop: checked against every job config, defaults filled in."""
    settled = dict(early_stop)
    metric, goal = task_metric(config_dict(configs[0]))
    if settled.get("metric") in (None, metric):
        settled["metric"], settled["goal"] = metric, settled.get("goal") or goal
    elif settled.get("goal") is None:
        raise InvalidEarlyStop("early_stop.goal", f"say max or min for {settled['metric']} (the task's metric is {metric})")
    for config in configs:
        _check(settled, config)
    return settled


def _check(settled: dict[str, Any], config: JobConfig) -> None:
    train = config.train
    if config.resources.workers > 1:
        raise InvalidEarlyStop("early_stop", "trials with resources.workers > 1 cannot stop at rungs")
    if settled.get("max_steps") is None:
        if train.max_steps is None:
            raise InvalidEarlyStop("early_stop.max_steps", "needed when the base trains for epochs")
        settled["max_steps"] = train.max_steps
    max_steps, min_steps, eta = settled["max_steps"], settled["min_steps"], settled["reduction_factor"]
    if train.max_steps is not None and max_steps > train.max_steps:
        raise InvalidEarlyStop("early_stop.max_steps", f"{max_steps} is past train.max_steps ({train.max_steps})")
    if min_steps > max_steps:
        raise InvalidEarlyStop("early_stop.min_steps", f"{min_steps} is past max_steps ({max_steps})")
    ladder = asha.rungs(min_steps, eta, max_steps)
    if len(ladder) > asha.MAX_RUNGS:
        raise InvalidEarlyStop("early_stop.min_steps", f"{len(ladder)} rungs; at most {asha.MAX_RUNGS}")
    if train.eval_every <= 0:
        raise InvalidEarlyStop("base.train.eval_every", "early stopping needs evaluations at its rungs (eval_every > 0)")
    for step in ladder:
        if step % train.eval_every and step != train.max_steps:
            raise InvalidEarlyStop("early_stop.min_steps", f"rung {step} is not a multiple of train.eval_every ({train.eval_every})")


def ladders(early_stop: Mapping[str, Any]) -> dict[int, tuple[int, ...]]:
    """{bracket: its rungs}."""
    args = (early_stop["min_steps"], early_stop["reduction_factor"], early_stop["max_steps"])
    n = asha.bracket_count(*args, early_stop["mode"])
    return {s: asha.rungs(*args, bracket=s) for s in range(n)}


T = TypeVar("T")


def launch_order(trials: Sequence[T], seed: int) -> list[T]:
    """The trials in the order they are queued: a permutation drawn from `seed`."""
    order = list(trials)
    random.Random(seed).shuffle(order)
    return order


def annotate(summary: dict[str, Any], early_stop: Mapping[str, Any], steps: Mapping[str, int]) -> None:
    """Add the rungs to a sweep summary and rung, steps_used and steps_saved to each of its
    rows; `steps` is {job id: steps trained}."""
    top = early_stop["max_steps"]
    every_rung = ladders(early_stop)[0]  # every bracket's rungs are among bracket 0's
    summary["rungs"] = list(every_rung)
    for row in summary["rows"]:
        used = [steps.get(job_id, 0) for job_id in row["job_ids"]]
        row["rung"] = max((s for s in every_rung if any(u >= s for u in used)), default=None)
        row["steps_used"] = sum(used)
        row["steps_saved"] = max(0, len(used) * top - sum(used))
