"""Invalid configs give a clear error that names the field."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, load_config, parse_config

BASE = {"data": {"kind": "recall"}}


def with_(**sections) -> dict:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize(
    "raw,field,words",
    [
        (with_(tbptt={"k1": 0}), "tbptt.k1", ">= 1"),
        (with_(tbptt={"k2": 0}), "tbptt.k2", ">= 1"),
        (with_(tbptt={"k1": 8, "k2": 16, "randomize": True}), "tbptt.randomize", "k1 == k2"),
        (with_(tbptt={"checkpoint_every": -1}), "tbptt.checkpoint_every", ">= 0"),
        (with_(tbptt={"mode": "partial"}), "tbptt.mode", "truncated"),
        (with_(tbptt={"reset_on": "document"}), "tbptt.reset_on", "no documents"),
        (with_(surprise=1), "surprise", "unknown field"),
        (with_(model={"layers": 2}), "model.layers", "unknown field"),
        (with_(data={"kind": "recall", "lags": 2}), "data.lags", "unknown field"),
        (with_(data={"kind": "recall", "lag": 0}), "data.lag", ">= 1"),
        (with_(data={"kind": "video"}), "data.kind", "recall"),
        ({"data": {"lag": 3}}, "data.kind", "required"),
        ({}, "data", "required"),
        (with_(model={"cell": "transformer"}), "model.cell", "lstm"),
        (with_(model={"hidden_size": 0}), "model.hidden_size", ">= 1"),
        (with_(model={"dropout": 1.0}), "model.dropout", "< 1"),
        (with_(model={"tie_weights": True}), "model.tie_weights", "embedding_dim == hidden_size"),
        (with_(data={"kind": "adding"}, model={"tie_weights": True, "embedding_dim": 128}), "model.tie_weights", "token inputs"),
        (with_(clip={"mode": "value"}), "clip.value", "required"),
        (with_(clip={"max_norm": 0}), "clip.max_norm", "> 0"),
        (with_(clip={"on_nonfinite": "ignore"}), "clip.on_nonfinite", "skip"),
        (with_(clip={"mode": "value", "value": 1, "per_parameter": True}), "clip.per_parameter", "norm only"),
        (with_(optim={"name": "lion"}), "optim.name", "sgd"),
        (with_(optim={"lr": -1}), "optim.lr", "> 0"),
        (with_(optim={"lr": 1e300}), "optim.lr", "<= 3.4"),  # past float32: not a worker crash
        (with_(train={"max_steps": 10, "epochs": 1}), "train.epochs", "not both"),
        (with_(train={"precision": "fp8"}), "train.precision", "fp32"),
        (with_(resources={"gpus": -1}), "resources.gpus", ">= 0"),
        (with_(max_attempts=0), "max_attempts", ">= 1"),
        ({"data": {"kind": "text"}}, "data.path", "exactly one of path or dataset"),
        ({"data": {"kind": "timeseries", "path": "x.csv"}}, "data.target", "required"),
    ],
)
def test_invalid_config_names_the_field(raw, field, words):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    fields = [path for path, _ in info.value.errors]
    assert field in fields, info.value.errors
    message = dict(info.value.errors)[field]
    assert words in message
    assert f"{field}: " in str(info.value)


def test_defaults_and_k2_follows_k1():
    config = parse_config({"data": {"kind": "recall"}, "tbptt": {"k1": 16}})
    assert config.tbptt.k2 == 16
    assert config.train.max_steps == 2000
    assert config.clip.max_norm == 1.0 and config.clip.norm_type == 2.0
    assert config.clip.on_nonfinite == "skip"
    assert config.clip.percentile == 10 and config.clip.history == 1000


def test_spec_example_parses(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        """
name: recall-k24
tags: [demo]
model: {cell: lstm, hidden_size: 128, num_layers: 1, embedding_dim: 32, dropout: 0.0, tie_weights: false}
data: {kind: recall, batch_size: 32, vocab: 4, lag: 8, length: 100000}
tbptt: {mode: truncated, k1: 24, k2: 24, reset_on: none, randomize: false, checkpoint_every: 0, reset_each_epoch: false}
clip: {mode: norm, max_norm: 1.0, on_nonfinite: skip}
optim: {name: adam, lr: 0.003, weight_decay: 0.0, schedule: constant}
train: {max_steps: 2000, eval_every: 200, checkpoint_every: 500, seed: 0, precision: fp32, device: auto}
resources: {gpus: 0, cpus: 1, workers: 1}
priority: 0
max_attempts: 3
"""
    )
    config = load_config(path)
    assert config.tbptt.k1 == 24 and config.data.lag == 8


def test_unparseable_file_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_a_job_may_opt_out_of_preemption():
    base = {"data": {"kind": "recall"}}
    assert parse_config(base).preemptible is True
    assert parse_config({**base, "preemptible": False}).preemptible is False
    with pytest.raises(ConfigError, match="preemptible"):
        parse_config({**base, "preemptible": "sometimes"})


@pytest.mark.parametrize("mode", ["truncated", "full", "adaptive", "unbiased"])
def test_a_parsed_config_reads_back_as_itself(mode):
    """The service stores config_dict(parse_config(raw)) and the worker parses it again."""
    from trainer.config import config_dict

    parsed = parse_config({"data": {"kind": "recall"}, "tbptt": {"mode": mode, "k1": 4}})
    assert parse_config(config_dict(parsed)) == parsed


def test_dataset_ids_are_bounded():
    for field in ("dataset", "valid_dataset"):
        with pytest.raises(ConfigError, match=f"data.{field}"):
            parse_config({"data": {"kind": "text", "path": "x.txt", field: "ds_" + "x" * 100}} if field == "valid_dataset"
                         else {"data": {"kind": "text", field: "../../etc/passwd"}})
