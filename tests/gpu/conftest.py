"""The GPU tests (issue 18): marked `cuda`, skipped with a reason where no CUDA device is
visible; bench/gpu.sh runs them with UNROLL_REQUIRE_CUDA=1, which turns the skip into a
failure (a GPU machine that cannot see its GPU must not pass quietly).

UNROLL_GPU_TESTS_DEVICE=cpu runs the same tests on the CPU: a check of the tests' own code
on machines without a GPU (what is CUDA-only in them is then left out, and they say so)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.gpu.common import DEVICE


def no_device_reason() -> str | None:
    if DEVICE.type != "cuda" or torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"no CUDA device visible (torch {torch.__version__}, {build})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = no_device_reason()
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if reason is None or not cuda_items:
        return
    if os.environ.get("UNROLL_REQUIRE_CUDA") == "1":
        raise pytest.UsageError(f"UNROLL_REQUIRE_CUDA=1 but {reason}")
    for item in cuda_items:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def float64():
    """Default dtype float64: gradient references compared to 1e-9 need it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
