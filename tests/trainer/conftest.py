"""Fixtures of the trainer's tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64():
    """Default dtype float64 for the test: gradient references compared to 1e-9 need it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
