"""Sweep benchmark (not a test): the recall truncation sweep through the API, the full grid
against early stopping (ASHA with pause and resume), on the whole system (HTTP → database →
Redis → `unroll worker` → Ray → trainer).

    .venv/bin/python bench/sweeps.py [--quick] [--seeds 3] [--max-parallel 2] [--target 0.9]

Both sweeps train the same trials (k1 in 2, 4, 8, 12, 16, 24, 32, 48, times seeds) of the
recall task. Reported per sweep: the update steps trained in all, the wall time from
submission to the last trial's end, the best point and the threshold (the smallest k1 whose
mean validation accuracy is above 0.9; for the early-stopped sweep, the accuracy each point
reached at its last rung). The target: early stopping uses at most 40% of the full grid's
steps and reaches the same conclusion. Prints a table, writes bench/results/sweeps.json and
a figure (accuracy against steps for every trial, rungs marked) to docs/figures/asha.png.
--target 0.9 runs the early-stopped sweep with early_stop.target 0.9 (trials that reach the
threshold stop there and leave the ranking).

Starts its own Ray head, a throwaway PostgreSQL database (SQLite if no server answers),
`unroll api` and `unroll worker` (bench/dispatch.py's Stack), and stops them all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dispatch import Stack, parse_time  # noqa: E402

K1 = [2, 4, 8, 12, 16, 24, 32, 48]
THRESHOLD = 0.9
TERMINAL = {"succeeded", "failed", "cancelled"}


def base_config(quick: bool) -> dict:
    """examples/recall-truncation.yaml; --quick: a smaller model, data and budget."""
    hidden, steps, length, valid = (64, 900, 30000, 1024) if quick else (128, 2000, 100000, 4096)
    return {
        "name": "recall-truncation",
        "model": {"cell": "lstm", "hidden_size": hidden},
        "data": {"kind": "recall", "batch_size": 32, "vocab": 4, "lag": 8, "length": length, "valid_length": valid},
        "tbptt": {"k1": 16},
        "clip": {"mode": "norm", "max_norm": 1.0},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"max_steps": steps, "eval_every": 50 if quick else 100, "checkpoint_every": 0, "seed": 0, "device": "cpu"},
        "resources": {"cpus": 1},
    }


def run_sweep(http: httpx.Client, body: dict, timeout: float) -> tuple[dict, float]:
    """Submit, wait until every trial has ended and stayed ended (a promotion requeues a
    paused trial just after its neighbour's end), return the sweep and its wall time."""
    r = http.post("/v1/sweeps", json=body)
    r.raise_for_status()
    sweep_id = r.json()["id"]
    deadline, calm = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        sweep = http.get(f"/v1/sweeps/{sweep_id}").json()
        calm = calm + 1 if all(job["state"] in TERMINAL for job in sweep["jobs"]) else 0
        if calm >= 6:
            break
        time.sleep(0.5)
    else:
        raise RuntimeError(f"sweep {sweep_id} did not end in {timeout}s")
    jobs = [http.get(f"/v1/jobs/{job['job_id']}").json() for job in sweep["jobs"]]
    wall = max(parse_time(j["finished_at"]) for j in jobs) - parse_time(sweep["created_at"])
    return sweep, wall


def conclusion(sweep: dict) -> dict:
    rows = sweep["summary"]["rows"]
    means = {row["point"]["tbptt.k1"]: row["final"]["mean"] for row in rows}
    above = [k for k, mean in means.items() if mean is not None and mean > THRESHOLD]
    return {
        "steps": sum(job["step"] for job in sweep["jobs"]),
        "best_point": sweep["summary"]["best_point"],
        "threshold_k1": min(above, default=None),
        "accuracy": means,
        "states": sweep["counts"],
    }


def curves(http: httpx.Client, sweep: dict) -> list[dict]:
    out = []
    for job in sweep["jobs"]:
        series = http.get(f"/v1/jobs/{job['job_id']}/metrics", params={"names": ["valid/accuracy"]}).json()["series"]
        out.append({"k1": job["point"]["tbptt.k1"], "seed": job["seed"], "points": series.get("valid/accuracy", [])})
    return out


def figure(path: Path, full: list[dict], asha: list[dict], rungs: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = {k: plt.cm.viridis(i / (len(K1) - 1)) for i, k in enumerate(K1)}
    for ax, trials, title in ((axes[0], full, "full grid"), (axes[1], asha, "ASHA, pause and resume")):
        for trial in trials:
            steps = [p[0] for p in trial["points"]]
            values = [p[1] for p in trial["points"]]
            ax.plot(steps, values, color=colors[trial["k1"]], lw=1, label=f"k1={trial['k1']}" if trial["seed"] == 0 else None)
            if steps:
                ax.plot(steps[-1], values[-1], "o", color=colors[trial["k1"]], ms=3)
        for rung in rungs:
            ax.axvline(rung, color="grey", lw=0.5, ls="--")
        ax.axhline(THRESHOLD, color="red", lw=0.5)
        ax.set_title(title)
        ax.set_xlabel("update steps")
    axes[0].set_ylabel("valid accuracy")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="hidden 64, 900 steps, rungs 50 · 3^k")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-parallel", type=int, default=2)
    parser.add_argument("--target", type=float, default=None, help="early_stop.target (e.g. 0.9: the threshold question)")
    parser.add_argument("--timeout", type=float, default=7200)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sweeps.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "asha.png")
    args = parser.parse_args()
    base = base_config(args.quick)
    early = {"min_steps": 100 if args.quick else 200, "reduction_factor": 3, "mode": "asha", "resume": True, "target": args.target}
    sweep_body = {"base": base, "grid": {"tbptt.k1": K1}, "seeds": args.seeds, "max_parallel": args.max_parallel}

    work = Path(tempfile.mkdtemp(prefix="unroll-bench-"))
    stack = Stack(work)
    try:
        url, token = stack.up()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            full, full_wall = run_sweep(http, sweep_body, args.timeout)
            asha, asha_wall = run_sweep(http, {**sweep_body, "early_stop": early}, args.timeout)
            full_curves, asha_curves = curves(http, full), curves(http, asha)
    finally:
        stack.down()

    a, b = conclusion(full), conclusion(asha)
    rungs = sorted({row["rung"] for row in asha["summary"]["rows"] if row["rung"]} | set(_rungs(asha["early_stop"])))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; database: {stack.database_url.split(':')[0]}")
    print(f"trials: {len(K1)} k1 x {args.seeds} seeds, {base['train']['max_steps']} steps each; rungs {rungs}; max_parallel {args.max_parallel}")
    print(f"{'sweep':24} {'steps':>8} {'wall s':>8} {'best k1':>8} {'k1 > 0.9':>9}")
    for name, c, wall in (("full grid", a, full_wall), ("ASHA, pause + resume" + (f", target {args.target:g}" if args.target is not None else ""), b, asha_wall)):
        best = (c["best_point"] or {}).get("tbptt.k1")
        print(f"{name:24} {c['steps']:8d} {wall:8.1f} {best!s:>8} {c['threshold_k1']!s:>9}")
    ratio = b["steps"] / a["steps"]
    same = a["threshold_k1"] == b["threshold_k1"]
    print(f"ASHA used {ratio:.0%} of the grid's steps (target <= 40%); same threshold: {same};"
          f" same best point: {a['best_point'] == b['best_point']}")
    figure(args.figure, full_curves, asha_curves, rungs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "full": {**a, "wall_s": full_wall}, "asha": {**b, "wall_s": asha_wall, "early_stop": asha["early_stop"]},
        "steps_ratio": ratio, "same_threshold": same, "same_best_point": a["best_point"] == b["best_point"],
        "quick": args.quick, "seeds": args.seeds, "max_parallel": args.max_parallel,
        "database": stack.database_url.split(":")[0], "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
        "curves": {"full": full_curves, "asha": asha_curves},
    }, indent=1))
    print(f"wrote {args.out} and {args.figure}")


def _rungs(early: dict) -> list[int]:
    from service.store.early_stop import ladders

    return list(ladders(early)[0])


if __name__ == "__main__":
    main()
