"""Which GPU an attempt trains on (issue 18). These run everywhere: Ray's assignment and
CUDA's numbering are faked where the machine has no GPU, and a Ray cluster with fake GPU
resources shows what Ray itself assigns to a fractional task. The one check that needs a
real GPU is marked `cuda`.

Ray gives each task that reserves GPUs (a fraction too) GPU ids and sets
CUDA_VISIBLE_DEVICES to them for that task; CUDA reads that variable once per process.
workers.attempt.pin_assigned_gpu makes the first assigned GPU current, in the numbering
the process's CUDA started with, so that `train.device: cuda` (and `auto`) lands on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.gpu.common import ON_CUDA
from trainer.config import parse_config
from workers import attempt
from workers.attempt import cuda_ordinal, gpus_as_reserved, pin_assigned_gpu
from workers.reporter import gpu_identity

ROOT = Path(__file__).resolve().parents[2]
JOB = {"data": {"kind": "recall"}, "train": {"device": "auto"}}


def test_the_ordinal_is_the_assigned_gpu_in_the_numbering_cuda_started_with():
    assert cuda_ordinal(["3"], "3") == 0  # Ray set the list to the task's GPU: it is cuda:0
    assert cuda_ordinal(["2"], "0,1,2,3") == 2  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES
    assert cuda_ordinal(["6"], "4, 6") == 1  # a node that shows Ray part of its GPUs
    assert cuda_ordinal(["5"], None) == 5  # no list: every GPU, by index
    with pytest.raises(RuntimeError, match="GPU 1 was assigned.*CUDA_VISIBLE_DEVICES='3'"):
        cuda_ordinal(["1"], "3")  # a reused process whose CUDA started for another task


class FakeCuda:
    """torch.cuda as a GPU node shows it, with set_device recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, assigned: list[str]):
        self.current: list[int] = []
        self.emptied = 0
        monkeypatch.setattr(attempt, "assigned_gpus", lambda: assigned)
        monkeypatch.setattr(attempt, "_cuda_numbering", [])  # a fresh worker process
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: bool(self.current))
        monkeypatch.setattr(torch.cuda, "set_device", self.current.append)
        monkeypatch.setattr(torch.cuda, "empty_cache", self._empty)

    def _empty(self) -> None:
        self.emptied += 1


def test_a_fractional_gpu_attempt_trains_on_the_gpu_ray_assigned(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # as Ray sets it for the task
    cuda = FakeCuda(monkeypatch, ["3"])
    config = parse_config({**JOB, "resources": {"gpus": 0.5}})
    with gpus_as_reserved(config) as inside:
        assert inside is config and cuda.current == [0]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"  # nothing hidden
    assert cuda.emptied == 1  # the allocator's cache goes back with the task

    # The same process, a later task given GPU 1: its CUDA still numbers GPU 3 alone.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(attempt, "assigned_gpus", lambda: ["1"])
    with pytest.raises(RuntimeError, match="GPU 1 was assigned"), gpus_as_reserved(config):
        pass


def test_the_numbering_is_the_one_cuda_started_with(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    cuda = FakeCuda(monkeypatch, ["2"])
    assert pin_assigned_gpu() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")  # changed later: CUDA would not see it
    monkeypatch.setattr(attempt, "assigned_gpus", lambda: ["1"])
    assert pin_assigned_gpu() == 1 and cuda.current == [2, 1]


def test_nothing_is_pinned_outside_ray_or_without_a_gpu(monkeypatch):
    cuda = FakeCuda(monkeypatch, [])
    assert pin_assigned_gpu() is None and cuda.current == []
    monkeypatch.setattr(attempt, "assigned_gpus", lambda: ["0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pin_assigned_gpu() is None and cuda.current == []


def test_the_log_names_the_gpu(monkeypatch):
    assert gpu_identity("cpu") == ""
    props = SimpleNamespace(name="NVIDIA H200", uuid="5e1f0c3a-0000-4000-8000-000000000001")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert gpu_identity("cuda:0") == " (NVIDIA H200, GPU-5e1f0c3a-0000-4000-8000-000000000001)"


@pytest.mark.cuda
@pytest.mark.skipif(not ON_CUDA, reason="names a real GPU")
def test_the_log_names_this_gpu():
    assert torch.cuda.get_device_name(0) in gpu_identity("cuda:0") and "GPU-" in gpu_identity("cuda:0")


RAY_TASKS = textwrap.dedent("""
    import json, os, ray
    from workers.attempt import assigned_gpus, cuda_ordinal

    @ray.remote
    def seen():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = assigned_gpus()
        return {"ids": ids, "visible": visible, "ordinal": cuda_ordinal(ids, visible) if ids else None}

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    halves = ray.get([seen.options(num_gpus=0.5).remote() for _ in range(2)])
    print(json.dumps({"half": halves, "none": ray.get(seen.options(num_gpus=0).remote())}))
    ray.shutdown()
""")


@pytest.mark.slow
def test_ray_gives_a_fractional_task_one_gpu_and_shows_it_alone():
    """Ray (fake GPU resources, so any machine can run it): a task of half a GPU is given
    one GPU id and CUDA_VISIBLE_DEVICES names that GPU alone, so the task's cuda:0 is it;
    a task that reserves none gets no id (and would see every GPU: gpus_as_reserved hides
    them)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    out = subprocess.run([sys.executable, "-c", RAY_TASKS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    for task in seen["half"]:
        assert len(task["ids"]) == 1 and task["visible"] == task["ids"][0] and task["ordinal"] == 0
    assert seen["none"]["ids"] == []
