"""Optimizers and learning-rate schedules.

The schedule is a function of the update count (plus, for `plateau`, a small state fed
by evaluations), so that it is trivially checkpointed and resumed.
"""

from __future__ import annotations

import math

import torch

from trainer.config import OptimConfig


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


class Schedule:
    def __init__(self, cfg: OptimConfig, total_steps: int):
        self.cfg, self.total_steps = cfg, max(1, total_steps)
        self.plateau_scale = 1.0  # plateau: product of the decays so far
        self.best = math.inf
        self.bad_evals = 0

    def lr(self, step: int) -> float:
        """Learning rate of update number `step` (0-based)."""
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            progress = min(1.0, (step - cfg.warmup_steps) / max(1, self.total_steps - cfg.warmup_steps))
            return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
        if cfg.schedule == "step":
            return cfg.lr * cfg.gamma ** ((step - cfg.warmup_steps) // cfg.step_size)
        if cfg.schedule == "plateau":
            return cfg.lr * self.plateau_scale
        return cfg.lr

    def observe(self, valid_loss: float) -> None:
        """Feed an evaluation; `plateau` decays after `patience` evaluations without a gain."""
        if self.cfg.schedule != "plateau" or not math.isfinite(valid_loss):
            return
        if valid_loss < self.best:
            self.best, self.bad_evals = valid_loss, 0
            return
        self.bad_evals += 1
        if self.bad_evals > self.cfg.patience:
            self.plateau_scale *= self.cfg.gamma
            self.bad_evals = 0

    def state_dict(self) -> dict:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_scale, self.best, self.bad_evals = state["plateau_scale"], state["best"], state["bad_evals"]
