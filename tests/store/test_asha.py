"""service.store.asha against the paper: rungs, brackets, and promotion decisions equal to a
plain transcription of Algorithm 2 of Li et al. (MLSys 2020) on recorded results."""

from __future__ import annotations

import math
import random

import pytest

from service.store import asha


def test_rungs_grow_by_eta_and_end_at_max_steps():
    assert asha.rungs(10, 3, 270) == (10, 30, 90, 270)
    assert asha.rungs(10, 3, 200) == (10, 30, 90, 200)
    assert asha.rungs(10, 3, 200, bracket=1) == (30, 90, 200)
    assert asha.rungs(10, 3, 200, bracket=3) == (200,)
    assert asha.rungs(50, 2, 50) == (50,)
    with pytest.raises(ValueError):
        asha.rungs(10, 1, 100)


def test_hyperband_brackets_start_one_rung_later_each():
    assert asha.bracket_count(10, 3, 270, "asha") == 1
    assert asha.bracket_count(10, 3, 270, "hyperband") == 4  # s = 0..3; bracket 3 runs to R
    assert [asha.bracket_of(i, 4) for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert asha.stop_step((10, 30, 90), 0) == 10
    assert asha.stop_step((10, 30, 90), 10) == 30
    assert asha.stop_step((10, 30, 90), 12) == 30  # resumed from a checkpoint between rungs


# --- the reference: Algorithm 2 as printed, one get_job call at a time ---------------------


def reference_get_job(rung_lists, promoted_sets, eta, better):
    """procedure get_job(): for k = top - 1 .. 0: candidates = top_k(rung k, |rung k| / eta);
    promotable = {t in candidates : t not already promoted}; if promotable: return it, k + 1.
    Otherwise a new configuration. rung_lists[k] is [(trial, value, order)]."""
    for k in reversed(range(len(rung_lists) - 1)):
        ranked = sorted(rung_lists[k], key=better)
        candidates = ranked[: len(rung_lists[k]) // eta]
        promotable = [t for t, _, _ in candidates if t not in promoted_sets[k]]
        if promotable:
            return promotable[0], k
    return None, None


def reference_promotions(rung_lists, promoted_sets, eta, goal):
    def better(entry):
        _, value, order = entry
        if value is None:
            return (1, 0.0, order)
        return (0, -value if goal == "max" else value, order)

    chosen = set()
    while True:  # promoted_sets is the reference's own record, kept across calls
        trial, k = reference_get_job(rung_lists, promoted_sets, eta, better)
        if trial is None:
            return chosen
        promoted_sets[k].add(trial)
        chosen.add(trial)


def simulate(seed: int, goal: str, eta: int):
    """Random learning curves reach rungs in a random order; after each arrival both rules
    decide which paused trials go on. The decisions are applied (the trial is active until
    it records its next rung), so later decisions build on earlier ones."""
    rng = random.Random(seed)
    ladder = asha.rungs(rng.choice([1, 2, 5]), eta, rng.choice([50, 100, 400]))
    n = rng.randint(eta, 30)
    trials = [asha.Trial(key=i, order=i) for i in range(n)]
    quality = [rng.random() for _ in range(n)]
    queue = list(range(n))  # trials that will record their next rung
    rng.shuffle(queue)
    decisions = []
    promoted_sets = [set() for _ in ladder]
    while queue:
        i = queue.pop(rng.randrange(len(queue)))
        trial = trials[i]
        trial.active = False
        step = asha.stop_step(ladder, max(trial.results, default=0))
        value = None if rng.random() < 0.05 else quality[i] * math.log(step + 1) + rng.gauss(0, 0.1)
        trial.results[step] = value
        mine = {t.key for t in asha.promotions(trials, {0: ladder}, eta, goal)}
        rung_lists = [[(t.key, t.results[s], t.order) for t in trials if s in t.results] for s in ladder]
        assert mine == reference_promotions(rung_lists, promoted_sets, eta, goal), (seed, step)
        decisions.append(sorted(mine))
        for key in mine:
            trials[key].active = True
            queue.append(key)
    return decisions, trials, ladder


@pytest.mark.parametrize("seed", range(60))
def test_promotions_equal_the_papers_rule_on_recorded_results(seed):
    decisions, trials, ladder = simulate(seed, "max" if seed % 2 else "min", 2 + seed % 3)
    assert any(decisions)  # the scenarios promote something
    # Rung k+1 holds at most what rung k promoted: successive halving's shape.
    counts = [sum(s in t.results for t in trials) for s in ladder]
    assert counts == sorted(counts, reverse=True)


def test_the_top_third_is_promoted_once_and_none_ranks_last():
    ladder = (10, 30, 90)
    trials = [asha.Trial(key=i, order=i, results={10: v}) for i, v in enumerate([0.5, None, 0.9, 0.1, 0.7, 0.8])]
    assert [t.key for t in asha.promotions(trials, {0: ladder}, 3, "max")] == [2, 5]
    assert [t.key for t in asha.promotions(trials, {0: ladder}, 3, "min")] == [3, 0]
    trials[2].active = True  # running again: promoted already
    assert [t.key for t in asha.promotions(trials, {0: ladder}, 3, "max")] == [5]


def test_brackets_are_judged_apart():
    ladders = {0: (10, 30, 90), 1: (30, 90)}
    trials = [asha.Trial(key=i, order=i, bracket=i % 2, results={10 if i % 2 == 0 else 30: float(i)}) for i in range(8)]
    # bracket 0: 10 → values 0, 2, 4, 6: top 1 = trial 6; bracket 1: at 30: 1, 3, 5, 7: top 1 = 7
    assert [t.key for t in asha.promotions(trials, ladders, 3, "max")] == [6, 7]


def test_arrival_rule_without_pausing_keeps_the_top_ceil_third():
    trials = [asha.Trial(key=i, order=i, results={10: v}) for i, v in enumerate([0.5, 0.9, 0.1, 0.7])]
    keep = [asha.continues_on_arrival(t, 10, trials, 3, "max") for t in trials]
    assert keep == [False, True, False, True]  # ⌈4/3⌉ = 2
    first = [asha.Trial(key=0, order=0, results={10: 0.0})]
    assert asha.continues_on_arrival(first[0], 10, first, 3, "max")  # alone: no basis to stop it


def test_idle_sweeps_resume_the_best_at_the_highest_rung_until_the_top_is_reached():
    ladder = (10, 30, 90)
    trials = [
        asha.Trial(key="a", order=0, results={10: 0.2}),
        asha.Trial(key="b", order=1, results={10: 0.9, 30: 0.6}),
        asha.Trial(key="c", order=2, results={10: 0.8, 30: 0.7}),
    ]
    assert asha.promotions(trials, {0: ladder}, 3, "max") == []  # ⌊2/3⌋ = 0 at rung 30
    assert [t.key for t in asha.idle_resumptions(trials, {0: ladder}, "max")] == ["c"]
    trials[2].active = True
    assert asha.idle_resumptions(trials, {0: ladder}, "max") == []  # something runs
    trials[2].active, trials[2].results[90] = False, 0.95
    assert asha.idle_resumptions(trials, {0: ladder}, "max") == []  # the top rung is reached


def test_with_a_target_resolved_trials_leave_the_ranking_and_the_best_open_one_goes_to_the_top():
    # Truncations 48, 32, 24 reached the target before rung 30; of the open trials at rung
    # 30 (12: 0.57, 16: 0.67) ⌊2/3⌋ = 0 are promoted, and with the resolved ones ranked
    # too, 16 would never be: it is the idle sweep's choice, then 12, then nothing.
    ladder = (10, 30, 90)
    trials = [
        asha.Trial(key=12, order=0, results={10: 0.46, 30: 0.57}),
        asha.Trial(key=16, order=1, results={10: 0.50, 30: 0.67}),
        asha.Trial(key=24, order=2, results={10: 0.53, 30: 0.81}, resolved=True),
        asha.Trial(key=32, order=3, results={10: 0.56, 30: 0.90}, resolved=True),
        asha.Trial(key=48, order=4, results={10: 0.60}, resolved=True),
    ]
    assert asha.promotions(trials, {0: ladder}, 3, "max") == []
    assert [t.key for t in asha.idle_resumptions(trials, {0: ladder}, "max")] == [16]
    trials[1].resolved = True  # 16 reached the target after its resumption
    assert [t.key for t in asha.idle_resumptions(trials, {0: ladder}, "max")] == [12]
    trials[0].results[90] = 0.89  # 12 trained to its end below the target: the boundary is known
    assert asha.idle_resumptions(trials, {0: ladder}, "max") == []
    # The same results without a target: 32 at rung 30 and 48 at rung 10 are promoted,
    # and no idle sweep resumes 16 while they run.
    for t in trials:
        t.resolved = False
    del trials[0].results[90]
    assert [t.key for t in asha.promotions(trials, {0: ladder}, 3, "max")] == [32, 48]


def test_the_summary_shows_rungs_steps_used_and_saved():
    from service.store.early_stop import annotate
    from service.store.sweeps import render_table

    early = {"min_steps": 10, "reduction_factor": 3, "max_steps": 90, "mode": "asha"}
    stat = {"mean": 0.5, "std": None, "n": 1, "nonfinite": 0}
    rows = [
        {"point": {"tbptt.k1": k}, "jobs_done": 2, "jobs_total": 2, "states": {}, "final": stat, "best": stat, "steps": None,
         "wall_s": None, "tokens_per_s": None, "peak_memory_bytes": None, "clipped_fraction": None, "skipped_steps": None,
         "job_ids": ids}
        for k, ids in ((2, ["a", "b"]), (4, ["c", "d"]), (8, ["e", "f"]))
    ]
    summary = {"metric": "valid/accuracy", "goal": "max", "axes": ["tbptt.k1"], "rows": rows, "best_point": None}
    annotate(summary, early, {"a": 10, "b": 10, "c": 30, "d": 12, "e": 90, "f": 0})
    assert [(r["rung"], r["steps_used"], r["steps_saved"]) for r in rows] == [(10, 20, 160), (30, 42, 138), (90, 90, 90)]
    assert summary["rungs"] == [10, 30, 90]  # what the dashboard marks on the curves
    table = render_table(summary).splitlines()
    assert table[0].split()[-2:] == ["rung", "steps_saved"] and table[2].split()[-2:] == ["30", "138"]
