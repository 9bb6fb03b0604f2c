"""Two gloo ranks in plain processes (no Ray) train exactly as one process with all the
streams: per-step losses within 1e-5, a group checkpoint resumes on a group and on one
process, and a bad split is a config error naming resources.workers."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.ranks import run_group, run_single
from trainer import checkpoint as ckpt
from trainer.config import ConfigError, parse_config

TOL = 1e-5


def config(steps: int = 16, **over) -> dict:
    cfg = {
        "model": {"cell": "lstm", "hidden_size": 16, "num_layers": 2},
        "data": {"kind": "recall", "vocab": 5, "lag": 3, "length": 200, "batch_size": 4, "valid_length": 64},
        "tbptt": {"k1": 6, "k2": 9},
        "clip": {"mode": "norm", "max_norm": 0.5},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"max_steps": steps, "eval_every": 8, "checkpoint_every": 8, "seed": 3, "device": "cpu"},
    }
    for section, values in over.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def close(a: dict[int, float | None], b: dict[int, float | None]) -> None:
    assert a.keys() == b.keys()
    for step in a:
        if a[step] is None or b[step] is None:
            assert a[step] is None and b[step] is None, step
        else:
            assert abs(a[step] - b[step]) <= TOL * max(1.0, abs(a[step])), (step, a[step], b[step])


def params(blob: bytes) -> dict[str, torch.Tensor]:
    return ckpt.from_bytes(blob)["model"]


def test_two_ranks_equal_one_process(tmp_path):
    cfg = config()
    single = run_single(cfg)
    ranks = run_group(2, cfg, tmp_path)
    close(ranks[0]["losses"], single["losses"])
    close(ranks[0]["norms"], single["norms"])  # the clip saw the global norm
    close(ranks[0]["valid"], single["valid"])
    # Every rank took the same steps: only rank 0 reports, the others' records are empty.
    assert ranks[1]["losses"] == {} and ranks[1]["checkpoints"] == {}
    final = max(single["checkpoints"])
    group_state = ckpt.from_bytes(ranks[0]["checkpoints"][final])
    for name, value in params(single["checkpoints"][final]).items():
        torch.testing.assert_close(group_state["model"][name], value, atol=TOL, rtol=TOL)
    # The group's checkpoint holds all four streams' carried state, like one process's.
    kept = group_state["cursor"]["kept"]
    assert kept[0].shape == (2, 4, 16) and group_state["ranks"]["world"] == 2
    assert ranks[0]["summary"]["steps"] == 16
    assert ranks[0]["summary"]["peak_memory_bytes"] >= ranks[1]["summary"]["peak_memory_bytes"]



@pytest.mark.parametrize("tbptt", [
    {"mode": "adaptive", "k1": 4, "k_min": 2, "k_max": 12, "adapt_every": 4},
    {"mode": "unbiased", "k1": 4, "k_min": 2},
], ids=["adaptive", "unbiased"])
def test_truncation_that_chooses_itself_is_the_same_on_two_ranks(tmp_path, tbptt):
    """Adaptive TBPTT measures the gradient's decay over every rank's streams (summed, as
    one process with all of them would), and unbiased TBPTT draws its truncations from the
    window generator every rank shares: two ranks choose the same k2 (and decay rate) or
    truncation length at every update as one process, and train the same."""
    cfg = config(tbptt=tbptt)
    cfg["tbptt"] = tbptt
    single = run_single(cfg)
    ranks = run_group(2, cfg, tmp_path)
    close(ranks[0]["losses"], single["losses"])
    chosen = single["truncation"]
    assert len({t[0] or t[2] for t in chosen.values()}) > 1  # the truncation did change
    assert chosen.keys() == ranks[0]["truncation"].keys()
    for step, (k2, beta, length) in chosen.items():
        theirs = ranks[0]["truncation"][step]
        assert (theirs[0], theirs[2]) == (k2, length), step
        assert (beta is None) == (theirs[1] is None) and (beta is None or abs(beta - theirs[1]) <= 1e-6), (step, beta, theirs[1])

def test_adding_with_documents_and_unscored_windows(tmp_path):
    # Episodes reset the state per stream; most windows score nothing (null loss).
    cfg = config(
        steps=12,
        data={"kind": "adding", "length": 10, "episodes": 64, "batch_size": 4, "valid_episodes": 8,
              "vocab": None, "lag": None, "valid_length": None},
        model={"cell": "gru"},
        tbptt={"k1": 4, "k2": 4, "reset_on": "document"},
        clip={"mode": "autoclip", "history": 10},
    )
    cfg["data"] = {k: v for k, v in cfg["data"].items() if v is not None}
    single = run_single(cfg)
    ranks = run_group(2, cfg, tmp_path)
    close(ranks[0]["losses"], single["losses"])
    assert any(v is None for v in single["losses"].values())


@pytest.mark.slow  # three groups and one process
def test_group_resume_is_exact(tmp_path):
    cfg = config(steps=16)
    whole = run_group(2, cfg, tmp_path / "whole")
    first = run_group(2, cfg, tmp_path / "first", stop_at=8)
    saved = first[0]["checkpoints"][8]
    resumed = run_group(2, cfg, tmp_path / "resumed", resume=saved)
    # A resumed group continues the same trajectory, bit for bit, on CPU.
    assert {s: v for s, v in whole[0]["losses"].items() if s > 8} == resumed[0]["losses"]
    for name, value in params(whole[0]["checkpoints"][16]).items():
        assert torch.equal(params(resumed[0]["checkpoints"][16])[name], value)
    # The same checkpoint resumes in one process (B streams, whatever the world size).
    single = run_single(cfg, resume=saved)
    close(single["losses"], resumed[0]["losses"])


def test_workers_must_divide_the_streams():
    with pytest.raises(ConfigError) as err:
        parse_config(config(resources={"workers": 3}))
    assert err.value.first_field == "resources.workers"
