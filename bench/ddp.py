"""Data-parallel throughput: tokens/s of one job on 1 process, a 1-rank group, and 2 ranks.

Not a test: it prints a table and writes JSON (bench/results/ddp.json by default).
The ranks are plain processes with a gloo group over a file:// rendezvous (what Ray
Train's TorchTrainer sets up for each rank, minus Ray's start-up), each running the
engine's `fit` on its block of the B streams with one CPU thread. Tokens/s is the job's
(every rank's streams) over rank 0's training time, as the service reports it.

Rows, same config (LSTM 256 x 1, recall, B 32, k1 = k2 = 32, Adam, norm clipping):
- 1 process: the single-process engine (no collectives);
- 1 rank:    the same through the data-parallel path with a world of one (its overhead);
- 2 ranks:   B/2 streams per rank, gradients all-reduced every update.
Each row is the median of `--repeats` runs; runs of different rows alternate, so each
sees the same background load on a shared machine.

    .venv/bin/python bench/ddp.py [--steps N] [--repeats R] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.distributed import GroupCallbacks, Sync  # noqa: E402
from trainer.loop import fit  # noqa: E402


def config(steps: int, hidden: int, batch: int, k: int) -> dict:
    return {
        "model": {"cell": "lstm", "hidden_size": hidden, "num_layers": 1, "embedding_dim": 32},
        "data": {"kind": "recall", "vocab": 16, "lag": 8, "length": 100_000, "batch_size": batch, "valid_length": 64},
        "tbptt": {"k1": k},
        "clip": {"mode": "norm", "max_norm": 1.0},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"max_steps": steps, "eval_every": 0, "checkpoint_every": 0, "seed": 0, "device": "cpu"},
    }


def _rank(rank: int, world: int, init: str, cfg: dict, out: str, grouped: bool) -> None:
    torch.set_num_threads(1)
    if not grouped:
        summary = fit(cfg)
    else:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        sync = Sync()
        summary = fit(cfg, [GroupCallbacks(sync)], sync=sync)
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(summary.to_dict()))


def run(world: int, grouped: bool, cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "summary.json")
        init = f"file://{tmp}/rendezvous"
        mp.start_processes(_rank, args=(world, init, cfg, out, grouped), nprocs=world, join=True, start_method="spawn")
        return json.loads(Path(out).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ddp.json")
    args = parser.parse_args()
    cfg = config(args.steps, args.hidden, args.batch, args.k)
    rows = {"1 process": (1, False), "1 rank": (1, True), "2 ranks": (2, True)}
    speeds: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, (world, grouped) in rows.items():
            speeds[name].append(run(world, grouped, cfg)["tokens_per_s"])
    base = statistics.median(speeds["1 process"])
    print(f"{'setup':<10} {'tokens/s (median)':>18} {'vs 1 process':>13}   runs")
    results = []
    for name, values in speeds.items():
        med = statistics.median(values)
        print(f"{name:<10} {med:>18,.0f} {med / base:>12.2f}x   {', '.join(f'{v:,.0f}' for v in values)}")
        results.append({"setup": name, "ranks": rows[name][0], "tokens_per_s_median": med, "tokens_per_s_runs": values, "ratio_vs_1_process": med / base})
    record = {
        "benchmark": "ddp",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "platform": platform.platform(), "torch": torch.__version__},
        "device": "cpu (gloo); no GPU was available, so no NCCL / multi-GPU rows",
        "config": cfg,
        "threads_per_rank": 1,
        "repeats": args.repeats,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
