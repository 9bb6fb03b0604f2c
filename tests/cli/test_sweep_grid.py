"""`unroll sweep --grid PATH=V1,V2,...`: reading the axes off the command line."""

from __future__ import annotations

import pytest

from service.cli.sweep import GridError, parse_early_stop, parse_grid


def test_parse_grid_reads_yaml_scalars():
    grid = parse_grid(["tbptt.k1=8,16, 32", "model.cell=lstm,gru", "tbptt.randomize=true,false", "clip.max_norm=0.25,1e-3,inf"])
    assert grid == {
        "tbptt.k1": [8, 16, 32],
        "model.cell": ["lstm", "gru"],
        "tbptt.randomize": [True, False],
        "clip.max_norm": [0.25, 0.001, "inf"],  # 1e-3 is a number (YAML 1.1 reads a string); inf is not JSON
    }
    for bad in (["tbptt.k1"], ["=1,2"], ["tbptt.k1="], ["tbptt.k1=1", "tbptt.k1=2"]):
        with pytest.raises(GridError):
            parse_grid(bad)


def test_parse_early_stop_reads_key_value_pairs():
    assert parse_early_stop(None) is None
    assert parse_early_stop("min_steps=100, reduction_factor=4,mode=hyperband,resume=false,metric=valid/accuracy") == {
        "min_steps": 100, "reduction_factor": 4, "mode": "hyperband", "resume": False, "metric": "valid/accuracy",
    }
    for bad in ("min_steps", "=3", "min_steps=", "min_steps=1,min_steps=2"):
        with pytest.raises(GridError):
            parse_early_stop(bad)
