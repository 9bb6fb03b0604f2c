"""Reproduce the headlines of the two self-choosing truncation modes (docs/tbptt.md).

1. ARTBP on influence balancing (Tallec & Ollivier 2017, §5): a scalar parameter θ is fed
   into a shift register of n units, +θ into the first p and −θ into the others; the loss
   reads the first unit. Over a long horizon θ's effect is (2p − n)·θ (negative here),
   while within fewer than p steps it is positive: TBPTT shorter than that follows the
   wrong sign and diverges, and ARTBP with the same mean length converges to θ* = 1/(2p − n).
   It uses the engine's ARTBP pieces (trainer.truncation's law, draws and compensation,
   trainer.tbptt.scale_gradient) on this hand-written system.
2. Adaptive TBPTT on `recall` (a known dependency length, the lag): runs of `trainer.loop.fit`
   from k_min = 2; the chosen k2 against the lag, and the validation loss against the
   backpropagated steps of a fixed-k grid.

    .venv/bin/python docs/tbptt_figures.py                 # both, then the figures
    .venv/bin/python docs/tbptt_figures.py --only influence
    .venv/bin/python docs/tbptt_figures.py --plot-only     # redraw from tbptt_results.json

Results go to docs/figures/tbptt_results.json, figures to docs/figures/tbptt_*.png (as
docs/figures.py does). Needs matplotlib (the dev extras).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "figures"
RESULTS = OUT / "tbptt_results.json"
sys.path.insert(0, str(ROOT))

# -- 1. influence balancing ------------------------------------------------------------------

UNITS, POSITIVE = 13, 4  # θ* = 1 / (2·4 − 13) = −0.2
HORIZON, LR, MEAN = 30_000, 0.002, 4


def influence(method: str, k: int, seed: int = 0) -> list[tuple[int, float]]:
    """θ over time, trained online: `truncated` (TBPTT(k, k)), `unbiased` (ARTBP, mean k)."""
    import torch

    from trainer.config import parse_config
    from trainer.tbptt import scale_gradient
    from trainer.truncation import compensation, draw_candidates

    torch.set_num_threads(1)
    tb = parse_config({"data": {"kind": "recall"}, "tbptt": {"mode": "unbiased", "k1": k}}).tbptt
    rng = torch.Generator().manual_seed(seed)
    u = torch.tensor([1.0] * POSITIVE + [-1.0] * (UNITS - POSITIVE), dtype=torch.float64, device="cpu")
    theta = torch.zeros((), dtype=torch.float64, device="cpu", requires_grad=True)
    state = torch.zeros(UNITS, dtype=torch.float64, device="cpu")
    t, trace = 0, [(0, 0.0)]
    while t < HORIZON:
        if method == "truncated":
            length, scales = k, {}
        else:
            length = draw_candidates(tb, torch.rand((), generator=rng, dtype=torch.float64, device="cpu").item())
            scales = compensation(tb, 0, length)
        s, loss = state.detach(), 0.0
        for step in range(length):
            if step in scales:
                s = scale_gradient(s, scales[step])
            s = torch.cat([s[1:], s.new_zeros(1)]) + theta * u  # shift, then θ's influences
            loss = loss + 0.5 * (s[0] - 1.0) ** 2
        (grad,) = torch.autograd.grad(loss / k, theta)  # a constant normaliser, as the engine
        with torch.no_grad():
            theta -= LR * grad
        state, t = s.detach(), t + length
        trace.append((t, theta.item()))
        if not math.isfinite(theta.item()) or abs(theta.item()) > 10:
            break  # diverged
    return trace[:: max(1, len(trace) // 400)] + [trace[-1]]


INFLUENCE_RUNS = [("truncated", 2), ("truncated", 4), ("truncated", 16), ("unbiased", 4), ("unbiased", 3), ("unbiased", 2)]

# -- 2. adaptive TBPTT on recall -------------------------------------------------------------

STEPS = 1500  # each fixed-k2 run of the grid
ADAPTIVE_STEPS = 3000  # an adaptive run: one run in place of the grid's six, given more updates


def recall_config(lag: int, tbptt: dict, steps: int = STEPS) -> dict:
    return {
        "model": {"cell": "lstm", "hidden_size": 64},
        "data": {"kind": "recall", "vocab": 4, "lag": lag, "length": 50_000, "batch_size": 16, "valid_length": 1024},
        "tbptt": tbptt,
        "clip": {"mode": "norm", "max_norm": 1.0},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"max_steps": steps, "eval_every": 100, "seed": 0, "device": "cpu"},
    }


def adaptive_runs() -> list[tuple[str, int, dict, int]]:
    """(name, lag, tbptt, updates) of every run. The learning rate is constant, so the first
    STEPS updates of an adaptive run are those of a run of STEPS updates."""
    adaptive = {"mode": "adaptive", "k1": 4, "k_min": 2, "k_max": 40, "delta": 0.05, "adapt_every": 50}
    runs = [(f"adaptive lag {lag}", lag, adaptive, ADAPTIVE_STEPS) for lag in (4, 8, 12)]
    runs += [(f"fixed k2={k} lag 8", 8, {"k1": 4, "k2": k}, STEPS) for k in (4, 8, 12, 16, 24, 32)]
    return runs


def headline(runs: list[dict]) -> dict | None:
    """Aicher et al.'s claim, on lag 8: does the adaptive run reach the fixed-k2 grid's best
    valid loss, and at what cost against the whole grid's (the cost of finding that k2)?"""
    grid = [run for run in runs if run["lag"] == 8 and run["tbptt"].get("mode") != "adaptive"]
    adaptive = next((run for run in runs if run["name"] == "adaptive lag 8"), None)
    if not grid or adaptive is None:
        return None
    best = min(grid, key=lambda run: run["evals"][-1][1])
    target = best["evals"][-1][1]
    reached = next(((step, loss, cost) for step, loss, _, cost in adaptive["evals"] if loss <= target), None)
    return {
        "grid_best": best["name"], "grid_best_loss": target, "grid_cost": sum(run["backpropagated_steps"] for run in grid),
        "grid_best_cost": best["backpropagated_steps"],
        "adaptive_reached_at_update": reached[0] if reached else None, "adaptive_loss": reached[1] if reached else None,
        "adaptive_cost": reached[2] if reached else None,
    }


def run_recall(task: tuple[str, int, dict, int]) -> dict:
    import torch

    torch.set_num_threads(1)
    from trainer.loop import Callback, fit

    name, lag, tbptt, updates = task

    class Record(Callback):
        def __init__(self):
            self.k2, self.evals, self.steps = [], [], 0  # steps: backpropagated steps so far

        def on_update(self, step, m):
            k2 = m.get("train/k2", tbptt.get("k2"))
            self.steps += k2
            if tbptt.get("mode") == "adaptive" and (step - 1) % tbptt["adapt_every"] == 0:
                self.steps += tbptt["k_max"]  # the measurement's long window
            self.k2.append((step, k2, m.get("train/decay_rate"), m.get("train/adapt_cost")))

        def on_eval(self, step, m):
            self.evals.append((step, m["valid/loss"], m["valid/accuracy"], self.steps))

    record, started = Record(), time.perf_counter()
    summary = fit(recall_config(lag, tbptt, updates), [record])
    return {
        "name": name, "lag": lag, "tbptt": tbptt, "k2": record.k2[:: 10], "evals": record.evals,
        "valid_accuracy": summary.valid_accuracy, "wall_s": time.perf_counter() - started,
        "backpropagated_steps": record.steps,
    }


def check() -> dict:
    """The issue's check: recall lag 8, adaptive from k_min 2, ends with k2 >= 8 and valid
    accuracy > 0.9 (the model and budget of tests/trainer/test_learning.py)."""
    from trainer.loop import Callback, fit

    class Last(Callback):
        metrics: dict = {}

        def on_update(self, step, m):
            self.metrics = m

    last, started = Last(), time.perf_counter()
    config = recall_config(8, {"mode": "adaptive", "k1": 8, "k_min": 2, "k_max": 32, "delta": 0.05, "adapt_every": 100})
    config["model"]["hidden_size"], config["data"]["batch_size"], config["data"]["length"] = 128, 32, 100_000
    config["data"]["valid_length"], config["train"]["max_steps"], config["train"]["eval_every"] = 2048, 1000, 0
    summary = fit(config, [last])
    result = {"k2": last.metrics["train/k2"], "decay_rate": last.metrics["train/decay_rate"], "adapt_cost": last.metrics["train/adapt_cost"],
              "valid_accuracy": summary.valid_accuracy, "wall_s": time.perf_counter() - started}
    print(f"check: final k2 {result['k2']:.0f} (lag 8), valid accuracy {result['valid_accuracy']:.4f}, measurement {result['adapt_cost']:.1%} of the time")
    assert result["k2"] >= 8 and result["valid_accuracy"] > 0.9, result
    return result


# -- plots ---------------------------------------------------------------------------------------


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "influence" in results:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for run in results["influence"]:
            t, theta = zip(*run["trace"])
            ax.plot(t, theta, label=f"{run['method']} (k{'' if run['method'] == 'truncated' else ' mean'} = {run['k']})")
        ax.axhline(1 / (2 * POSITIVE - UNITS), color="k", ls=":", label="θ* (full BPTT)")
        ax.set(xlabel="time step", ylabel="θ", ylim=(-1, 2), title="Influence balancing: ARTBP vs TBPTT")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(OUT / "tbptt_influence.png", dpi=120)
    if "recall" in results:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
        for run in results["recall"]:
            if run["tbptt"].get("mode") == "adaptive":
                steps, k2 = zip(*[(s, k) for s, k, *_ in run["k2"]])
                left.plot(steps, k2, label=f"lag {run['lag']}")
                left.axhline(run["lag"], ls=":", lw=0.8)
            if run["lag"] == 8:
                _, loss, _, cost = zip(*run["evals"])
                right.plot(cost, loss, marker="o" if "adaptive" in run["name"] else ".", label=run["name"].replace(" lag 8", ""))
        left.set(xlabel="update", ylabel="chosen k2", title="Adaptive k2 (dotted: the lag)")
        left.legend(fontsize=7)
        right.set(xlabel="backpropagated steps (incl. measurements)", ylabel="valid loss", yscale="log", title="recall lag 8: adaptive vs fixed k2")
        right.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(OUT / "tbptt_adaptive.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["influence", "recall", "check"])
    parser.add_argument("--runs", help="recall: only these runs (comma-separated names, e.g. 'adaptive lag 8'), the others kept from the results file")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.plot_only:
        if args.only in (None, "influence"):
            results["influence"] = [{"method": m, "k": k, "trace": influence(m, k)} for m, k in INFLUENCE_RUNS]
            for run in results["influence"]:
                print(f"influence {run['method']:9} k={run['k']:2}: θ = {run['trace'][-1][1]:+.4f} at t = {run['trace'][-1][0]}")
        if args.only in (None, "recall"):
            chosen = adaptive_runs()
            if args.runs:
                names = set(args.runs.split(","))
                chosen = [run for run in chosen if run[0] in names]
                if len(chosen) != len(names):
                    parser.error(f"--runs: unknown name among {sorted(names)}; known: {[run[0] for run in adaptive_runs()]}")
            with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
                fresh = {run["name"]: run for run in pool.map(run_recall, chosen)}
            kept = {run["name"]: run for run in results.get("recall", [])}
            results["recall"] = [fresh.get(name) or kept[name] for name, *_ in adaptive_runs() if name in fresh or name in kept]
            for run in results["recall"]:
                at = {step: (loss, acc, cost) for step, loss, acc, cost in run["evals"]}
                for step in sorted({STEPS, run["evals"][-1][0]}):
                    if step in at:
                        loss, acc, cost = at[step]
                        print(f"{run['name']:20} update {step:5} valid loss {loss:.4f} acc {acc:.3f} backprop steps {cost:.0f}")
            results["headline"] = headline(results["recall"])
            print("headline:", results["headline"])
        if args.only in (None, "check"):
            results["check"] = check()
        RESULTS.write_text(json.dumps(results))
    plot(results)


if __name__ == "__main__":
    main()
