"""Make the figures and the numbers of docs/guide.md from real runs of the examples.

Each run is `trainer.loop.fit` on an example config (examples/*.yaml) with one field
changed, exactly as one point of the corresponding `unroll sweep` would run it, minus the
service. Results go to docs/figures/results.json (every evaluation, and the per-update
gradient norms of the clipping runs); the PNGs are drawn from that file, so

    .venv/bin/python docs/figures.py              # run everything (~15 min on 2 busy cores), plot
    .venv/bin/python docs/figures.py --plot-only  # redraw from results.json
    .venv/bin/python docs/figures.py --only adding --jobs 1

Needs matplotlib (the dev extras); the stdlib and goog groups need examples/make_data.py's files
(`make install` writes them). Runs use one thread each, `--jobs` at a time.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import multiprocessing
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "figures"
RESULTS = OUT / "results.json"

# (group, example, dotted path, values): the sweeps the guide shows.
SWEEPS = [
    ("truncation", "recall-truncation.yaml", "tbptt.k1", [2, 4, 8, 16, 32]),
    ("clipping", "text-clipping.yaml", "clip.max_norm", [0.1, 0.25, 1.0, 4.0, 1000.0]),
    ("randomize", "text-clipping.yaml", "tbptt.randomize", [True]),
    ("adding", "adding-resets.yaml", "tbptt.k1", [10, 25, 50]),
    # Real data (examples/make_data.py writes the files): one epoch / 10 epochs per point.
    ("stdlib", "text-stdlib.yaml", "tbptt.k1", [8, 16, 32, 64, 128, 256]),
    ("goog", "timeseries-goog.yaml", "tbptt.k1", [1, 2, 4, 8, 16, 32, 64]),
]
SEEDS = {"goog": 3}  # runs per point (train.seed 0..N-1); the other groups run seed 0
# The stdlib runs see STDLIB_CHARS training characters each (max_steps = STDLIB_CHARS / (k * 32)):
# just under the config's one epoch (2.60 M), with 6 evaluations each instead of one every 200 updates.
STDLIB_CHARS = 2_600_000


def set_path(config: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.5g}")  # keeps results.json small


def run_point(task: tuple[str, str, str, object, int]) -> dict:
    group, example, path, value, seed = task
    import torch

    torch.set_num_threads(1)
    from trainer.loop import Callback, fit

    config = yaml.safe_load((ROOT / "examples" / example).read_text())
    config = copy.deepcopy(config)
    set_path(config, path, value)
    config["train"]["seed"] += seed
    if group == "stdlib":
        steps = STDLIB_CHARS // (value * config["data"]["batch_size"])
        config["train"].update(epochs=None, max_steps=steps, eval_every=max(1, steps // 6))
    if config["data"].get("path"):
        config["data"]["path"] = str(ROOT / config["data"]["path"])
    keep_norms = group in ("clipping", "randomize")

    class Record(Callback):
        def __init__(self) -> None:
            self.evals: list[dict] = []
            self.norms: list[tuple[int, float | None, float | None, float | None]] = []

        def on_update(self, step, metrics):
            if keep_norms:
                names = ("train/grad_norm", "train/grad_norm_clipped", "train/loss")
                self.norms.append((step, *(_round(metrics.get(name)) for name in names)))

        def on_eval(self, step, metrics):
            self.evals.append({"step": step, **metrics})

    record = Record()
    started = time.perf_counter()
    summary = fit(config, [record])
    print(f"{group} {path}={value} seed {seed}: {time.perf_counter() - started:.0f}s {record.evals[-1]}", file=sys.stderr, flush=True)
    return {
        "group": group, "example": example, "path": path, "value": value, "seed": seed,
        "summary": summary.to_dict(), "evals": record.evals, "norms": record.norms,
    }


def run(groups: set[str], jobs: int) -> list[dict]:
    tasks = [(g, ex, path, v, seed) for g, ex, path, values in SWEEPS if g in groups for v in values for seed in range(SEEDS.get(g, 1))]
    # Longest first, so two workers finish together.
    tasks.sort(key=lambda t: -(t[3] if isinstance(t[3], (int, float)) and t[2] == "tbptt.k1" else 20))
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return pool.map(run_point, tasks, chunksize=1)


# --- figures ----------------------------------------------------------------------------------


def _by(results: list[dict], group: str) -> list[dict]:
    return sorted((r for r in results if r["group"] == group), key=lambda r: r["value"])


def plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    trunc = _by(results, "truncation")
    if trunc:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        ks = [r["value"] for r in trunc]
        left.plot(ks, [r["summary"]["valid_accuracy"] for r in trunc], "o-", label="valid accuracy")
        left.plot(ks, [r["summary"]["final_valid_loss"] for r in trunc], "s--", label="valid loss (nats)")
        left.axhline(0.25, color="grey", ls=":", label="chance (0.25)")
        left.axvline(8, color="red", ls=":", label="lag = 8")
        left.set_xscale("log", base=2)
        left.set_xticks(ks, [str(k) for k in ks])
        left.set_xlabel("truncation length k = k1 = k2")
        left.set_title("recall (lag 8) after 2,000 updates")
        left.legend(fontsize=8)
        for i, r in enumerate(trunc):
            right.plot([e["step"] for e in r["evals"]], [e["valid/accuracy"] for e in r["evals"]], "o-", ms=3, color=colors[i], label=f"k = {r['value']}")
        right.axhline(0.25, color="grey", ls=":")
        right.set_xlabel("update")
        right.set_ylabel("valid accuracy")
        right.set_title("learning curves")
        right.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(OUT / "truncation.png", dpi=110)
        plt.close(fig)

    clip = _by(results, "clipping")
    if clip:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        shown = [r for r in clip if r["value"] in (0.25, 1000.0)]
        for ax, r in zip(axes[:2], shown):
            steps = [n[0] for n in r["norms"]]
            ax.semilogy(steps, [n[1] if n[1] else math.nan for n in r["norms"]], lw=0.7, label="before clipping (train/grad_norm)")
            ax.semilogy(steps, [n[2] if n[2] else math.nan for n in r["norms"]], lw=0.7, label="after (train/grad_norm_clipped)")
            if r["value"] < 1000:
                ax.axhline(r["value"], color="red", ls=":", label=f"max_norm = {r['value']}")
            title = "no clipping (max_norm 1000)" if r["value"] >= 1000 else f"clip.max_norm = {r['value']}"
            ax.set_title(f"text, SGD lr 20: {title}")
            ax.set_xlabel("update")
            ax.set_ylabel("global gradient norm")
            ax.legend(fontsize=8)
        ax = axes[2]
        norms = [r["value"] for r in clip]
        ax.plot(norms, [r["summary"]["valid_ppl"] for r in clip], "o-", label="final valid ppl")
        ax.plot(norms, [min(e["valid/ppl"] for e in r["evals"] if e["valid/ppl"]) for r in clip], "s--", label="best valid ppl")
        ax.set_xscale("log")
        ax.set_xlabel("clip.max_norm (1000 = effectively off)")
        ax.set_ylabel("valid perplexity (chars)")
        ax.set_title("final quality against the clipping threshold")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(OUT / "clipping.png", dpi=110)
        plt.close(fig)

    adding = _by(results, "adding")
    if adding:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for i, r in enumerate(adding):
            ax.semilogy([e["step"] for e in r["evals"]], [e["valid/mse"] for e in r["evals"]], "o-", ms=3, color=colors[i], label=f"k = {r['value']}")
        ax.axhline(1 / 6, color="grey", ls=":", label="predict 1.0 (0.167)")
        ax.axhline(1 / 12, color="grey", ls="--", label="knows one value (1/12)")
        ax.set_xlabel("update")
        ax.set_ylabel("valid MSE")
        ax.set_title("adding, 50-step episodes, reset_on: document")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(OUT / "adding.png", dpi=110)
        plt.close(fig)
    if _by(results, "stdlib"):
        _plot_stdlib(_by(results, "stdlib"), plt, colors)
    if _by(results, "goog"):
        _plot_goog(_by(results, "goog"), plt, colors)


# --- real data (examples/make_data.py) --------------------------------------------------------


def _chars(r: dict, step: int) -> float:
    """Training characters seen by `step` updates of a stdlib run (k1 steps of 32 streams each)."""
    return step * r["value"] * 32


def _plot_stdlib(runs: list[dict], plt, colors) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ks = [r["value"] for r in runs]
    left.plot(ks, [r["summary"]["valid_bpc"] for r in runs], "o-", label="valid bpc after one epoch")
    left.set_xscale("log", base=2)
    left.set_xticks(ks, [str(k) for k in ks])
    left.set_xlabel("truncation length k = k1 = k2")
    left.set_ylabel("valid bits per character")
    left.set_title("stdlib docstrings (2.7 MB), char LSTM, one epoch")
    speed = left.twinx()
    speed.plot(ks, [r["summary"]["tokens_per_s"] / 1000 for r in runs], "s:", color="grey", label="k chars/s (train)")
    speed.set_ylabel("thousand chars / s (one busy core)")
    handles = [h for ax in (left, speed) for h in ax.get_legend_handles_labels()[0]]
    left.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left")
    for i, r in enumerate(runs):
        evals = [e for e in r["evals"] if e.get("valid/bpc")]
        right.plot([_chars(r, e["step"]) / 1e6 for e in evals], [e["valid/bpc"] for e in evals], "o-", ms=2, color=colors[i], label=f"k = {r['value']}")
    right.set_xlabel("training characters seen (millions)")
    right.set_ylabel("valid bpc")
    right.set_title("learning curves (same characters for every k)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "stdlib.png", dpi=110)
    plt.close(fig)


def goog_baselines(valid_fraction: float = 0.2) -> dict[str, float]:
    """Valid MSE (z-scored as the trainer does) of rules that need no training: tomorrow's range is
    the training mean, today's range (persistence), or the mean of the last 5 days."""
    import numpy as np

    with (ROOT / "examples" / "data" / "goog.csv").open() as fh:
        series = np.array([float(row["range"]) for row in csv.DictReader(fh)])
    n_train = int(len(series) * (1 - valid_fraction))
    z = (series - series[:n_train].mean()) / series[:n_train].std(ddof=1)
    target = z[n_train + 1 :]
    last5 = np.array([z[i - 4 : i + 1].mean() for i in range(n_train, len(z) - 1)])
    return {
        "training mean": float((target**2).mean()),
        "persistence": float(((z[n_train:-1] - target) ** 2).mean()),
        "mean of the last 5 days": float(((last5 - target) ** 2).mean()),
    }


def _seed_stats(runs: list[dict]) -> list[tuple[int, list[float], list[float], list[dict]]]:
    """Per k: (k, final valid MSE per seed, best valid MSE per seed, the runs)."""
    out = []
    for k in sorted({r["value"] for r in runs}):
        group = [r for r in runs if r["value"] == k]
        out.append((k, [r["summary"]["valid_mse"] for r in group], [min(e["valid/mse"] for e in r["evals"]) for r in group], group))
    return out


def _plot_goog(runs: list[dict], plt, colors) -> None:
    import numpy as np

    stats = _seed_stats(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ks = [k for k, *_ in stats]
    for values, label, style in ((1, "final valid MSE", "o-"), (2, "best valid MSE (any evaluation)", "s--")):
        left.errorbar(ks, [np.mean(s[values]) for s in stats], yerr=[np.std(s[values]) for s in stats], fmt=style, capsize=3, label=f"{label}, mean ± std of {len(stats[0][1])} seeds")
    for (name, mse), ls in zip(goog_baselines().items(), (":", "-.", "--")):
        left.axhline(mse, color="grey", ls=ls, label=f"{name} ({mse:.2f})")
    left.set_xscale("log", base=2)
    left.set_xticks(ks, [str(k) for k in ks])
    left.set_xlabel("truncation length k = k1 = k2 (days)")
    left.set_ylabel("valid MSE (z-scored next-day range)")
    left.set_title("GOOG 2004-2008, next day's range, 10 epochs")
    left.legend(fontsize=7)
    for i, (k, _, _, group) in enumerate(stats):
        evals, summary = group[0]["evals"], group[0]["summary"]
        per_epoch = summary["steps"] / summary["epochs"]  # ceil(209 / k) windows per stream
        right.plot([e["step"] / per_epoch for e in evals], [e["valid/mse"] for e in evals], "o-", ms=2, color=colors[i % len(colors)], label=f"k = {k}")
    right.set_xlabel("epoch (836 training days: 4 streams of 209)")
    right.set_ylabel("valid MSE (seed 0)")
    right.set_title("learning curves")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "goog.png", dpi=110)
    plt.close(fig)


def real_tables(results: list[dict]) -> list[str]:
    lines = []
    stdlib = _by(results, "stdlib")
    if stdlib:
        lines += ["| k1 = k2 | updates | valid bpc | best valid bpc | train chars/s | wall s |", "|---|---|---|---|---|---|"]
        for r in stdlib:
            s = r["summary"]
            best = min(e["valid/bpc"] for e in r["evals"] if e.get("valid/bpc"))
            lines.append(f"| {r['value']} | {s['steps']} | {s['valid_bpc']:.3f} | {best:.3f} | {s['tokens_per_s']:.0f} | {s['wall_s']:.0f} |")
        lines.append("")
    goog = _by(results, "goog")
    if goog:
        lines += ["| k1 = k2 | updates | final valid MSE | best valid MSE | wall s (mean) |", "|---|---|---|---|---|"]
        for k, final, best, group in _seed_stats(goog):
            wall = sum(r["summary"]["wall_s"] for r in group) / len(group)
            lines.append(f"| {k} | {group[0]['summary']['steps']} | {_mean_std(final)} | {_mean_std(best)} | {wall:.0f} |")
        lines += ["", "| no training | valid MSE |", "|---|---|", *(f"| {n} | {v:.3f} |" for n, v in goog_baselines().items()), ""]
    return lines


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.3f} ± {math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)):.3f}"


# --- the numbers ------------------------------------------------------------------------------


def _pct(values: list[float | None], q: float) -> float:
    finite = sorted(v for v in values if v is not None and math.isfinite(v))
    return finite[min(len(finite) - 1, int(q * len(finite)))] if finite else math.nan


def tables(results: list[dict]) -> str:
    lines = []
    trunc = _by(results, "truncation")
    if trunc:
        lines += ["| k1 = k2 | valid accuracy | best accuracy | valid loss | first eval >= 0.9 | tokens/s | wall s |", "|---|---|---|---|---|---|---|"]
        for r in trunc:
            s = r["summary"]
            reached = next((e["step"] for e in r["evals"] if (e["valid/accuracy"] or 0) >= 0.9), None)
            best = max(e["valid/accuracy"] or 0 for e in r["evals"])
            lines.append(f"| {r['value']} | {s['valid_accuracy']:.3f} | {best:.3f} | {s['final_valid_loss']:.3f} | {reached or '-'} | {s['tokens_per_s']:.0f} | {s['wall_s']:.0f} |")
        lines.append("")
    clip = _by(results, "clipping") + _by(results, "randomize")
    if clip:
        lines += ["| run | final valid ppl | best valid ppl | bpc | clipped fraction | median / p99 / max pre-clip norm | wall s |", "|---|---|---|---|---|---|---|"]
        for r in clip:
            s = r["summary"]
            pre = [n[1] for n in r["norms"]]
            label = f"clip.max_norm={r['value']:g}" if r["group"] == "clipping" else "max_norm=0.25, randomize: true"
            best = min(e["valid/ppl"] for e in r["evals"] if e["valid/ppl"])
            lines.append(
                f"| {label} | {s.get('valid_ppl', math.nan):.3f} | {best:.3f} | {s.get('valid_bpc', math.nan):.3f} | {s['clipped_fraction']:.2f} "
                f"| {_pct(pre, 0.5):.3g} / {_pct(pre, 0.99):.3g} / {max(p for p in pre if p is not None):.3g} | {s['wall_s']:.0f} |"
            )
        lines.append("")
    adding = _by(results, "adding")
    if adding:
        lines += ["| k1 = k2 | valid MSE @ 500 | @ 1000 | @ 1500 | final (2000) | wall s |", "|---|---|---|---|---|---|"]
        for r in adding:
            at = {e["step"]: e["valid/mse"] for e in r["evals"]}
            lines.append(f"| {r['value']} | {at.get(500, math.nan):.4f} | {at.get(1000, math.nan):.4f} | {at.get(1500, math.nan):.4f} | {r['summary']['valid_mse']:.4f} | {r['summary']['wall_s']:.0f} |")
        lines.append("")
    return "\n".join(lines + real_tables(results))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted({s[0] for s in SWEEPS}), help="run these groups (repeatable)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--plot-only", action="store_true", help="redraw from results.json")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    if not args.plot_only:
        groups = set(args.only or [s[0] for s in SWEEPS])
        fresh = run(groups, args.jobs)
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else []  # again: another --only may have written
        results = [r for r in results if r["group"] not in groups] + fresh
        OUT.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, separators=(",", ":"), allow_nan=False) + "\n")
    plot(results)
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
