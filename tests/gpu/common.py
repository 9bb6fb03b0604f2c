"""What the GPU tests share: the device they run on, and trainers built there."""

from __future__ import annotations

import os

import torch

from trainer.config import parse_config
from trainer.data import Data, load_data
from trainer.loop import Trainer

# cuda, or cpu to check the tests' own code where no GPU is (tests/gpu/conftest.py)
DEVICE = torch.device(os.environ.get("UNROLL_GPU_TESTS_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"

RECALL = {"kind": "recall", "vocab": 4, "lag": 2, "length": 400, "batch_size": 4, "valid_length": 32}


def job(data: dict | None = None, **overrides) -> dict:
    """A small job on DEVICE (its resources reserve a GPU, as train.device: cuda requires)."""
    raw = {
        "model": {"hidden_size": 16, "num_layers": 2, "embedding_dim": 8},
        "data": data or RECALL,
        "tbptt": {"k1": 8},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"max_steps": 100, "device": DEVICE.type},
        "resources": {"gpus": 1 if ON_CUDA else 0},
    }
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return raw


def make_trainer(data: dict | None = None, **overrides) -> Trainer:
    config = parse_config(job(data, **overrides))
    return Trainer(config, load_data(config.data, config.train.seed), DEVICE)


def trainer_on(config: dict, data: Data) -> Trainer:
    """A trainer of given streams (host tensors: the trainer copies each window over)."""
    return Trainer(parse_config(config), data, DEVICE)
