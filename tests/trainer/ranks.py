"""Helpers that run a data-parallel group as plain processes (no Ray): a gloo group over a
file:// rendezvous, one process per rank, each running `fit` on its block of streams."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer import checkpoint as ckpt
from trainer.distributed import GroupCallbacks, Sync
from tests.trainer.test_resume import StopAt
from trainer.loop import Callback, fit


class Recorder(Callback):
    """Losses and norms per step, checkpoints as bytes, the summary."""

    def __init__(self):
        self.losses: dict[int, float | None] = {}
        self.norms: dict[int, float | None] = {}
        self.valid: dict[int, float | None] = {}
        # adaptive's k2 and decay rate, unbiased's truncation length
        self.truncation: dict[int, tuple[float | None, float | None, float | None]] = {}
        self.checkpoints: dict[int, bytes] = {}
        self.summary: dict | None = None

    def on_update(self, step, metrics):
        self.losses[step] = metrics["train/loss"]
        self.norms[step] = metrics["train/grad_norm"]
        self.truncation[step] = tuple(metrics.get(f"train/{name}") for name in ("k2", "decay_rate", "truncation_length"))

    def on_eval(self, step, metrics):
        self.valid[step] = metrics["valid/loss"]

    def on_checkpoint(self, step, checkpoint):
        self.checkpoints[step] = ckpt.to_bytes(checkpoint)

    def on_end(self, summary):
        self.summary = summary.to_dict()


def _rank_main(rank: int, world: int, init: str, config: dict, resume: bytes | None, stop_at: int | None, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        sync = Sync()
        rec = Recorder()
        inner: list[Callback] = [rec] + ([StopAt(stop_at)] if stop_at else [])
        state = sync.local_checkpoint(ckpt.from_bytes(resume)) if resume else None
        summary = fit(config, [GroupCallbacks(sync, inner)], resume=state, sync=sync)
        torch.save(
            {"losses": rec.losses, "norms": rec.norms, "valid": rec.valid, "truncation": rec.truncation, "checkpoints": rec.checkpoints,
             "summary": rec.summary if rank == 0 else summary.to_dict()},
            Path(out) / f"rank{rank}.pt",
        )
        # Leave together: a rank that tears its group down while the other still talks to
        # it can abort (gloo's threads) instead of exiting cleanly.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_group(world: int, config: dict, tmp: Path, resume: bytes | None = None, stop_at: int | None = None) -> list[dict[str, Any]]:
    """Run `config` on `world` processes; returns each rank's record (rank 0's holds the
    reported metrics and checkpoints)."""
    tmp.mkdir(parents=True, exist_ok=True)
    init = f"file://{tmp / 'rendezvous'}"
    if (tmp / "rendezvous").exists():
        os.unlink(tmp / "rendezvous")
    mp.start_processes(_rank_main, args=(world, init, config, resume, stop_at, str(tmp)), nprocs=world, join=True, start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def run_single(config: dict, resume: bytes | None = None, stop_at: int | None = None) -> dict[str, Any]:
    rec = Recorder()
    callbacks: list[Callback] = [rec] + ([StopAt(stop_at)] if stop_at else [])
    fit(config, callbacks, resume=ckpt.from_bytes(resume) if resume else None)
    return {"losses": rec.losses, "norms": rec.norms, "valid": rec.valid, "truncation": rec.truncation, "checkpoints": rec.checkpoints, "summary": rec.summary}
