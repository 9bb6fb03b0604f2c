"""Data-parallel TBPTT: N ranks with B/N streams each train exactly as one process with B.

Rank r owns the contiguous block of streams [r·B/N, (r+1)·B/N) and carries their hidden
states. The loss of an update is the sum over scored (step, stream) pairs divided by their
number (docs/tbptt.md), so each rank divides its own loss sum by the *global* count, and
the sum over ranks of the gradients is the one-process gradient (up to float
reassociation). Gradients are summed with one `all_reduce` of a flat buffer right after
backward, before unscaling and clipping: the clip sees the global norm, and since every
rank then holds the same gradients, every rank takes the same optimizer step.

Nothing here runs unless `workers > 1`: the engine (trainer/loop.py) calls a `Sync` only
where one is given. A checkpoint of a group is an ordinary checkpoint of B streams (the
kept states of the ranks concatenated along the stream axis) plus each rank's RNG state,
so it resumes on any number of ranks that divides B.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.distributed as dist

from trainer.config import ConfigError
from trainer.data import Streams, Window
from trainer.loop import Callback, Summary, Trainer
from trainer.models import State
from trainer.tbptt import Runner, evaluate, map_state


class ShardStreams(Streams):
    """Streams [lo, hi) of a set of B streams; reads the full window and keeps its block."""

    def __init__(self, base: Streams, lo: int, hi: int):
        self.base, self.lo, self.hi = base, lo, hi
        self.length, self.batch_size = base.length, hi - lo

    def window(self, start: int, end: int) -> Window:
        w = self.base.window(start, end)
        return Window(*(t[:, self.lo : self.hi].contiguous() for t in (w.inputs, w.targets, w.scored, w.starts)))

    def aligned_starts(self) -> list[int] | None:
        return self.base.aligned_starts()  # the same answer on every rank


def shard_bounds(batch_size: int, rank: int, world: int) -> tuple[int, int]:
    if batch_size % world:
        raise ConfigError([("resources.workers", f"must divide the {batch_size} streams of data.batch_size (got {world})")])
    per = batch_size // world
    return rank * per, (rank + 1) * per


class Sync:
    """This rank's place in the group and the collectives the engine needs.

    Uses the default process group (Ray Train's TorchTrainer, or torch.distributed's
    init_process_group, sets it up)."""

    def __init__(self, rank: int | None = None, world: int | None = None):
        self.rank = dist.get_rank() if rank is None else rank
        self.world = dist.get_world_size() if world is None else world
        # Where the scalars of collectives live: the model's device (NCCL, the backend of
        # GPU groups, reduces CUDA tensors only). Set by attach.
        self.device = torch.device("cpu")

    # -- hooks called by trainer.loop.Trainer (its DataParallel protocol) ---------------

    def attach(self, trainer: Trainer) -> None:
        """Before the carried state exists: take this rank's streams, start from rank 0's
        parameters, and give the rank its own dropout randomness."""
        trainer.streams = self.shard(trainer.data.train)
        self.device = trainer.device
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in trainer.params])
            dist.broadcast(flat, src=0)
            offset = 0
            for p in trainer.params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        if self.rank:  # rank 0 keeps the seed, so one rank is the one-process run
            torch.manual_seed(trainer.config.train.seed + 7919 * self.rank)

    def shard(self, streams: Streams) -> ShardStreams:
        lo, hi = shard_bounds(streams.batch_size, self.rank, self.world)
        return ShardStreams(streams, lo, hi)

    def count(self, local: int) -> int:
        """Scored (step, stream) pairs of the window over all ranks."""
        total = torch.tensor([local], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return int(total.item())

    def reduce_gradients(self, params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Sum gradients (and this rank's share of the loss) over ranks, in place, with one
        collective; returns the global loss. Every rank computes the same graph, so the
        same parameters have gradients everywhere."""
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[-1]

    def evaluate(self, runner: Runner, valid: Streams, device: torch.device) -> dict[str, float]:
        """Each rank evaluates its block of the validation streams; sums are reduced.
        Validation streams that the ranks cannot share evenly run whole on every rank."""
        if valid.batch_size % self.world:
            return evaluate(runner, valid, device)
        result = evaluate(runner, self.shard(valid), device)
        count = result["count"]
        sums = torch.tensor([result["loss"] * count, result["correct"] * count, count], dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        loss, correct, count = sums.tolist()
        return {"loss": loss / max(count, 1), "correct": correct / max(count, 1), "count": count}

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over ranks (a new tensor, where `t` lives)."""
        total = t.to(self.device, copy=True)
        dist.all_reduce(total)
        return total.to(t.device)

    # -- scalars -------------------------------------------------------------------------

    def max(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def any(self, flag: bool) -> bool:
        return self.max(1.0 if flag else 0.0) > 0

    # -- checkpoints ---------------------------------------------------------------------

    def gather_checkpoint(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """Rank 0 gets one checkpoint of all B streams; other ranks get None."""
        mine = {"kept": state["cursor"]["kept"], "rng": state["rng"]}
        parts: list[Any] = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if self.rank:
            return None
        full = dict(state)
        full["cursor"] = {**state["cursor"], "kept": _cat_states([p["kept"] for p in parts])}
        full["ranks"] = {"world": self.world, "rng": [p["rng"] for p in parts]}
        return full

    def local_checkpoint(self, state: dict[str, Any] | None) -> dict[str, Any] | None:
        """This rank's part of a checkpoint of B streams (from any number of ranks)."""
        if state is None:
            return None
        local = copy.copy(state)
        kept = state["cursor"]["kept"]
        batch = (kept[0] if isinstance(kept, tuple) else kept).shape[1]
        lo, hi = shard_bounds(batch, self.rank, self.world)
        local["cursor"] = {**state["cursor"], "kept": map_state(lambda s: s[:, lo:hi].clone(), kept)}
        ranks = state.get("ranks")
        if ranks and ranks["world"] == self.world:
            local["rng"] = ranks["rng"][self.rank]
        return local

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _cat_states(states: list[State]) -> State:
    if isinstance(states[0], tuple):
        return tuple(torch.cat(parts, dim=1) for parts in zip(*states))
    return torch.cat(states, dim=1)


class GroupCallbacks(Callback):
    """Runs on every rank around the callbacks of rank 0 (which alone report and write).

    The loop calls callbacks at the same points on every rank, so collectives live here:
    rank 0's stop decision is shared, checkpoints are gathered to rank 0, and the summary's
    peak memory is the maximum over ranks."""

    def __init__(self, sync: Sync, callbacks: Iterable[Callback] = ()):
        self.sync = sync
        self.callbacks = list(callbacks) if sync.rank == 0 else []

    def on_start(self, info):
        for cb in self.callbacks:
            cb.on_start({**info, "workers": self.sync.world})

    def on_update(self, step, metrics):
        for cb in self.callbacks:
            cb.on_update(step, metrics)

    def on_eval(self, step, metrics):
        for cb in self.callbacks:
            cb.on_eval(step, metrics)

    def on_checkpoint(self, step, checkpoint):
        full = self.sync.gather_checkpoint(checkpoint)
        for cb in self.callbacks:
            cb.on_checkpoint(step, full)

    def on_model(self, artifact):
        for cb in self.callbacks:  # rank 0's parameters are the group's
            cb.on_model(artifact)

    def should_stop(self) -> bool:
        return self.sync.any(any(cb.should_stop() for cb in self.callbacks))

    def on_end(self, summary: Summary) -> None:
        summary.peak_memory_bytes = int(self.sync.max(summary.peak_memory_bytes))
        for cb in self.callbacks:
            cb.on_end(summary)
