"""Gradient clipping, applied once per update after every gradient of the update exists.

`Clipper.clip` returns the global gradient norm before and after clipping and whether it
clipped; with fp16 the caller has already unscaled the gradients (GradScaler.unscale_).
All three are tensors on the parameters' device, whatever the path (the caller stacks
them into one transfer): every tensor made here names its device
(tests/trainer/test_device_factories.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from trainer.config import ClipConfig


@dataclass(frozen=True)
class ClipResult:
    norm: torch.Tensor  # global norm before clipping (0-dim tensor, may be non-finite)
    clipped_norm: torch.Tensor  # global norm after clipping
    clipped: torch.Tensor  # 0-dim bool: did clipping change any gradient


def total_norm(grads: list[torch.Tensor], norm_type: float, device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(grads, norm_type=norm_type)


def unitwise_norm(x: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Norm per output unit (row) of a weight; one norm for vectors and scalars (NFNets)."""
    if x.ndim <= 1:
        return x.norm(norm_type)
    return x.norm(norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)


class Clipper:
    def __init__(self, cfg: ClipConfig):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.history)  # autoclip: pre-clip norms

    def clip(self, parameters: list[nn.Parameter]) -> ClipResult:
        params = [p for p in parameters if p.grad is not None]
        grads = [p.grad for p in params]
        cfg = self.cfg
        norm = total_norm(grads, cfg.norm_type, parameters[0].device if parameters else torch.device("cpu"))
        if cfg.mode == "none" or not torch.isfinite(norm):
            return ClipResult(norm, norm, torch.zeros_like(norm, dtype=torch.bool))
        if cfg.mode == "norm" and not cfg.per_parameter:
            return self._scale_to(grads, norm, cfg.max_norm)
        if cfg.mode == "autoclip":
            # AutoClip (Seetharaman et al., 2020): the threshold is a percentile of the
            # history of pre-clip norms, the current one included.
            self.history.append(norm.item())
            # The history is host floats: the percentile is taken on the host.
            history = torch.tensor(list(self.history), dtype=torch.float64, device="cpu")
            threshold = torch.quantile(history, cfg.percentile / 100).item()
            return self._scale_to(grads, norm, threshold)
        before = [g.clone() for g in grads]
        if cfg.mode == "norm":  # per_parameter
            for g in grads:
                _scale_(g, g.norm(cfg.norm_type), cfg.max_norm)
        elif cfg.mode == "value":
            torch.nn.utils.clip_grad_value_(params, cfg.value)
        elif cfg.mode == "agc":
            for p in params:
                _agc_(p, cfg.agc_factor, cfg.agc_eps, cfg.norm_type)
        return ClipResult(norm, total_norm(grads, cfg.norm_type, norm.device), _changed(before, grads, norm))

    def _scale_to(self, grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> ClipResult:
        coef = _scale_(grads, norm, max_norm)
        return ClipResult(norm, norm * coef, coef < 1.0)

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state["history"])


def _changed(before: list[torch.Tensor], after: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """0-dim bool on `like`'s device: does any gradient differ (compared there, no sync)."""
    if not before:
        return torch.zeros_like(like, dtype=torch.bool)
    return torch.stack([torch.ne(a, b).any() for a, b in zip(before, after)]).any().to(like.device)


def _scale_(grads: torch.Tensor | list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale gradients so their norm is at most max_norm, as clip_grad_norm_ does."""
    grads = [grads] if isinstance(grads, torch.Tensor) else grads
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].device)) if grads else None
    return coef


def _agc_(p: nn.Parameter, factor: float, eps: float, norm_type: float) -> None:
    """Unit-wise adaptive gradient clipping (Brock et al., 2021, "High-Performance
    Large-Scale Image Recognition Without Normalization")."""
    max_norm = unitwise_norm(p.detach(), norm_type).clamp(min=eps) * factor
    grad_norm = unitwise_norm(p.grad, norm_type)
    clipped = p.grad * (max_norm / grad_norm.clamp(min=1e-6))
    p.grad.copy_(torch.where(grad_norm < max_norm, p.grad, clipped))
