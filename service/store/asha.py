"""Early stopping for sweeps: asynchronous successive halving (ASHA), pure (no I/O).

Li et al., "A System for Massively Parallel Hyperparameter Tuning" (MLSys 2020):

- Rungs (§3.2): a trial of bracket s is judged at steps r·η^(s+k), k = 0, 1, ... below the
  maximum R, and at R itself (the last rung: the trial's whole budget). r is `min_steps`,
  η `reduction_factor`, R `max_steps`.
- Promotion (Algorithm 2, `get_job`): from the highest rung below the top down to rung 0,
  the candidates at rung k are the top ⌊|rung k| / η⌋ of the results recorded there; a
  candidate not yet promoted is promoted to rung k + 1. `promotions` returns every trial
  that repeated calls of `get_job` would promote before drawing a new configuration
  (the sweep's unstarted grid points are its "new configurations": they are queued already).
- Hyperband (§3.3, "asynchronous Hyperband"): brackets of ASHA, bracket s starting at
  r·η^s; s runs from 0 to s_max = the number of rungs of bracket 0 below R, so the last
  bracket trains every one of its trials to R. A sweep's trial i (grid order) runs in
  bracket i mod (s_max + 1); with `mode: asha` every trial is in bracket 0.

A grid is a finite set of configurations, and the paper's rule alone may leave a bracket
with no trial at its top rung (⌊2 / 3⌋ = 0 of two trials at the last rung below R are
promoted). `idle_resumptions` says what to do when a sweep has nothing left to run: each
bracket whose top rung no trial has reached resumes its best paused trial of its highest
reached rung (the brief's "spare slots and nothing else to run").

Without pausing (`resume: false`) a trial is judged once, when it reaches a rung:
`continues_on_arrival` (top ⌈n / η⌉ of the n results at that rung, counting its own, as
Ray Tune's ASHA scheduler does: the first arrivals are not stopped for lack of company).
A trial it stops is stopped for good.

A value of None (not finite) ranks below every finite value; ties rank by trial order
(the grid's), so decisions are deterministic.

With a target (the sweep's `early_stop.target`: "which points reach this value?", e.g. the
smallest truncation whose accuracy reaches 0.9), a trial that reaches it has answered the
question for its point and stops there (`resolved`). The rule is then applied to the open
trials only: resolved trials leave every rung's ranking (they need no more budget, and a
promotion slot they would take goes to the best open trial), and `idle_resumptions` trains
the best open trial to the top rung, so that a sweep ends with its best open point either
resolved or known not to reach the target within the budget. This extension is ours; the
paper ranks every trial for the best one.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

# Bounds for the sweep body (service.api.schemas): a rung every η^k steps needs η >= 2, and
# more than this many rungs is a grid search in disguise.
MIN_REDUCTION_FACTOR = 2
MAX_REDUCTION_FACTOR = 100
MAX_RUNGS = 32


def rungs(min_steps: int, eta: int, max_steps: int, bracket: int = 0) -> tuple[int, ...]:
    """The steps at which a trial of `bracket` is judged, the last one `max_steps`."""
    if min_steps < 1 or eta < MIN_REDUCTION_FACTOR or max_steps < min_steps or bracket < 0:
        raise ValueError("rungs need 1 <= min_steps <= max_steps, eta >= 2 and bracket >= 0")
    steps = []
    step = min_steps * eta**bracket
    while step < max_steps:
        steps.append(step)
        step *= eta
    return (*steps, max_steps)


def bracket_count(min_steps: int, eta: int, max_steps: int, mode: str) -> int:
    """1 for ASHA; s_max + 1 for Hyperband (the last bracket runs its trials to the end)."""
    if mode == "asha":
        return 1
    return len(rungs(min_steps, eta, max_steps))


def bracket_of(index: int, brackets: int) -> int:
    """The bracket of a sweep's trial number `index` (grid order): round robin."""
    return index % brackets


def stop_step(ladder: Sequence[int], start: int) -> int:
    """Where an attempt that starts at step `start` stops: its next rung."""
    return next((step for step in ladder if step > start), ladder[-1])


@dataclass
class Trial:
    """What the rule knows of one trial: its order in the sweep, its bracket, the value it
    recorded at each rung it reached ({rung step: value}), whether it is active (queued or
    running: already promoted past its last recorded rung), and whether it is resolved
    (it reached the sweep's target: out of the ranking)."""

    key: Hashable
    order: int
    bracket: int = 0
    results: dict[int, float | None] = field(default_factory=dict)
    active: bool = False
    resolved: bool = False


def _open(trials: Sequence[Trial], bracket: int) -> list[Trial]:
    return [t for t in trials if t.bracket == bracket and not t.resolved]


def _rank(value: float | None, order: int, goal: str) -> tuple[int, float, int]:
    if value is None or not math.isfinite(value):
        return (1, 0.0, order)
    return (0, -value if goal == "max" else value, order)


def top(results: Sequence[tuple[Trial, float | None]], n: int, goal: str) -> list[Trial]:
    """The n best of [(trial, value)], best first."""
    ranked = sorted(results, key=lambda pair: _rank(pair[1], pair[0].order, goal))
    return [trial for trial, _ in ranked[: max(0, n)]]


def _recorded(trials: Sequence[Trial], step: int) -> list[tuple[Trial, float | None]]:
    return [(t, t.results[step]) for t in trials if step in t.results]


def promoted(trial: Trial, step: int) -> bool:
    """The trial went on past the rung at `step`: it is running again, or reached a later rung."""
    return trial.active or any(s > step for s in trial.results)


def promotions(trials: Sequence[Trial], ladders: Mapping[int, Sequence[int]], eta: int, goal: str) -> list[Trial]:
    """Every paused trial that Algorithm 2 promotes now, bracket by bracket, each from the
    highest rung where it is a candidate (a trial is paused at one rung only)."""
    chosen: list[Trial] = []
    for bracket, ladder in sorted(ladders.items()):
        members = _open(trials, bracket)
        for step in reversed(ladder[:-1]):
            recorded = _recorded(members, step)
            for trial in top(recorded, len(recorded) // eta, goal):
                if not promoted(trial, step) and trial not in chosen:
                    chosen.append(trial)
    return chosen


def continues_on_arrival(trial: Trial, step: int, trials: Sequence[Trial], eta: int, goal: str) -> bool:
    """`resume: false`: does a trial that just recorded the rung at `step` go on?"""
    recorded = _recorded(_open(trials, trial.bracket), step)
    return trial in top(recorded, math.ceil(len(recorded) / eta), goal)


def idle_resumptions(trials: Sequence[Trial], ladders: Mapping[int, Sequence[int]], goal: str) -> list[Trial]:
    """With nothing active and nothing promotable: per bracket that has no open trial at its
    top rung, its best paused open trial among those at the highest rung reached."""
    if any(t.active for t in trials):
        return []
    chosen = []
    for bracket, ladder in sorted(ladders.items()):
        members = [t for t in _open(trials, bracket) if t.results]
        if not members or any(ladder[-1] in t.results for t in members):
            continue
        highest = max(max(t.results) for t in members)
        best = top(_recorded(members, highest), 1, goal)
        chosen.extend(t for t in best if not promoted(t, highest))
    return chosen
