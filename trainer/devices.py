"""The device a run trains on, and the memory it peaked at (Summary.peak_memory_bytes)."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch

from trainer.config import ConfigError


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError([("train.device", "cuda requested but no CUDA device is visible")])
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())  # the one the worker pinned
    return torch.device("cpu")


def reset_peak_memory(device: torch.device) -> None:
    """Start this run's peak afresh: a worker process runs many jobs in turn."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux: "5" restarts the VmHWM high-water mark
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak. CPU: the process's peak resident memory since
    `reset_peak_memory` (VmHWM; ru_maxrss would carry a parent's or an earlier job's peak)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
