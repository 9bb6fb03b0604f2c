"""Data sources: synthetic tasks as SPEC §2 defines them, text and time series files,
streams cut as batchify does, and windows read by position."""

from __future__ import annotations

import torch
import pytest

from trainer.config import ConfigError, parse_config
from trainer.data import EOS, IGNORE, RecallStreams, adding_streams, load_data, tokenize
from trainer.loop import Callback, fit


def test_recall_targets_are_the_input_lag_steps_back():
    streams = RecallStreams(vocab=6, lag=5, length=10_000, batch_size=3, seed=1, split="train")
    whole = streams.window(0, 9000)
    assert (whole.targets[:5] == IGNORE).all() and not whole.scored[:5].any()
    assert torch.equal(whole.targets[5:], whole.inputs[:-5])
    assert whole.inputs.max() < 6
    # Windows read anywhere (across generation chunks) agree with the whole.
    for a, b in [(4090, 4100), (0, 3), (8190, 8200), (3, 4)]:
        part = streams.window(a, b)
        assert torch.equal(part.inputs, whole.inputs[a:b])
        assert torch.equal(part.targets, whole.targets[a:b])


def test_recall_is_deterministic_per_seed_and_split():
    a = RecallStreams(4, 2, 100, 2, seed=0, split="train").window(0, 100).inputs
    assert torch.equal(a, RecallStreams(4, 2, 100, 2, seed=0, split="train").window(0, 100).inputs)
    assert not torch.equal(a, RecallStreams(4, 2, 100, 2, seed=1, split="train").window(0, 100).inputs)
    assert not torch.equal(a, RecallStreams(4, 2, 100, 2, seed=0, split="valid").window(0, 100).inputs)


def test_adding_task():
    streams = adding_streams(length=50, episodes=4000, batch_size=8, seed=0, split="train")
    assert streams.length == 50 * 500 and streams.batch_size == 8
    w = streams.window(0, streams.length)
    markers = w.inputs[..., 1].reshape(500, 50, 8)
    assert torch.all(markers.sum(dim=1) == 2)  # two marked steps per episode
    values = w.inputs[..., 0].reshape(500, 50, 8)
    sums = (values * markers).sum(dim=1)
    assert torch.allclose(w.targets.reshape(500, 50, 8)[:, -1], sums)
    assert w.scored.reshape(500, 50, 8)[:, -1].all() and w.scored.sum() == 500 * 8
    assert streams.aligned_starts() == list(range(0, streams.length, 50))
    mse_of_one = ((1.0 - sums) ** 2).mean().item()
    assert mse_of_one == pytest.approx(1 / 6, abs=0.01)  # SPEC: predicting 1.0 scores ~0.167


def test_tokenizers():
    assert tokenize("ab c", "char") == ["a", "b", " ", "c"]
    assert tokenize("the cat\nsat", "word") == ["the", "cat", EOS, "sat", EOS]


def test_text_documents_and_splits(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcabc\n\nbca\n\ncab cab\n\nabc")
    config = parse_config({"data": {"kind": "text", "path": str(corpus), "batch_size": 1, "valid_fraction": 0.2}})
    data = load_data(config.data, seed=0)
    assert data.task.metric == "ppl" and data.task.bits_per_char
    w = data.train.window(0, data.train.length)
    text = "".join(data.vocab[i] for i in w.inputs[:, 0].tolist())
    assert text.startswith("abcabcbca")  # separators are not tokens
    starts = w.starts[:, 0].nonzero().flatten().tolist()
    assert starts[:3] == [0, 6, 9]
    # The last token of a document has no target: nothing is predicted across documents.
    assert w.targets[5, 0] == IGNORE and w.targets[8, 0] == IGNORE
    assert data.vocab[w.targets[0, 0]] == "b"


def test_text_words_with_valid_path(tmp_path):
    (tmp_path / "train.txt").write_text("a b c\nb c a\n" * 20)
    (tmp_path / "valid.txt").write_text("a b zzz\n")
    config = parse_config({"data": {"kind": "text", "path": str(tmp_path / "train.txt"), "valid_path": str(tmp_path / "valid.txt"), "tokenizer": "word", "batch_size": 2}})
    data = load_data(config.data, seed=0)
    assert data.vocab[0] == "<unk>" and EOS in data.vocab
    valid = data.valid.window(0, data.valid.length)
    assert 0 in valid.inputs.flatten().tolist()  # the unseen word maps to <unk>
    assert not data.task.bits_per_char


def test_missing_text_file_names_the_field(tmp_path):
    config = parse_config({"data": {"kind": "text", "path": str(tmp_path / "nope.txt")}})
    with pytest.raises(ConfigError, match="data.path"):
        load_data(config.data, seed=0)


def test_uploads_resolve_and_pinned_bytes_are_checked(tmp_path):
    """data.valid_dataset is resolved like data.dataset; a pinned sha256 that the file's
    bytes do not have stops the job before training, naming the pin."""
    import hashlib

    (tmp_path / "ds_train").write_text("a b c\nb c a\n" * 20)
    (tmp_path / "ds_valid").write_text("c b a\n")
    pin = hashlib.sha256((tmp_path / "ds_train").read_bytes()).hexdigest()
    data = {"kind": "text", "dataset": "ds_train", "valid_dataset": "ds_valid", "tokenizer": "word", "batch_size": 2, "sha256": pin}
    resolve = lambda dataset_id: tmp_path / dataset_id  # noqa: E731
    loaded = load_data(parse_config({"data": data}).data, seed=0, resolve=resolve)
    assert loaded.valid.length == 2  # "c b a" + end of document in 2 streams: the file, not a split
    (tmp_path / "ds_valid").write_text("c b a c\n")
    with pytest.raises(ConfigError, match="data.valid_sha256: .* has sha256 "):
        load_data(parse_config({"data": {**data, "valid_sha256": pin}}).data, seed=0, resolve=resolve)


def test_timeseries_is_zscored_on_the_train_split(tmp_path):
    path = tmp_path / "series.csv"
    rows = ["t,x,y,label"] + [f"{i},{i * 0.5 + 3},{(i % 7) * 2.0},a" for i in range(200)]
    path.write_text("\n".join(rows))
    config = parse_config({"data": {"kind": "timeseries", "path": str(path), "columns": ["x", "y"], "target": "y", "valid_fraction": 0.25, "batch_size": 1}})
    data = load_data(config.data, seed=0)
    assert data.task.features == 2 and data.task.metric == "mse"
    w = data.train.window(0, data.train.length)
    assert w.inputs.shape == (150, 1, 2)
    assert torch.allclose(w.inputs.mean(dim=(0, 1)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(w.inputs.std(dim=(0, 1)), torch.ones(2), atol=1e-5)
    assert torch.allclose(w.targets[:-1, 0], w.inputs[1:, 0, 1])  # next step's target
    bad = parse_config({"data": {"kind": "timeseries", "path": str(path), "target": "label"}})
    with pytest.raises(ConfigError, match="data.target: column 'label' is not numeric"):
        load_data(bad.data, seed=0)


class Metrics(Callback):
    def __init__(self):
        self.updates = []

    def on_update(self, step, metrics):
        self.updates.append(metrics)


def test_full_mode_cuts_whole_episodes_and_adding_learns_with_resets():
    rec = Metrics()
    summary = fit({
        "model": {"cell": "gru", "hidden_size": 32},
        "data": {"kind": "adding", "length": 20, "episodes": 640, "valid_episodes": 64, "batch_size": 32},
        "tbptt": {"mode": "full", "reset_on": "document"},
        "optim": {"lr": 0.01},
        "train": {"max_steps": 300, "eval_every": 0, "device": "cpu"},
    }, [rec])
    assert {m["train/k1"] for m in rec.updates} == {20.0}
    assert summary.valid_mse < 0.05  # well below the 0.167 of always predicting 1.0


def test_randomized_windows_scale_the_learning_rate():
    rec = Metrics()
    fit({
        "model": {"hidden_size": 8},
        "data": {"kind": "recall", "length": 5000, "batch_size": 2},
        "tbptt": {"k1": 20, "randomize": True},
        "optim": {"lr": 0.01},
        "train": {"max_steps": 200, "eval_every": 0, "device": "cpu"},
    }, [rec])
    ks = [m["train/k1"] for m in rec.updates]
    assert len(set(ks)) > 5 and min(ks) >= 5
    assert any(k < 15 for k in ks)  # the k/2 branch is drawn about 5% of the time
    for m in rec.updates:
        assert m["train/lr"] == pytest.approx(0.01 * m["train/k1"] / 20)


def test_timeseries_trains_end_to_end(tmp_path):
    path = tmp_path / "sine.csv"
    import math

    path.write_text("v\n" + "\n".join(f"{math.sin(i / 5):.5f}" for i in range(3000)))
    summary = fit({
        "model": {"cell": "lstm", "hidden_size": 16},
        "data": {"kind": "timeseries", "path": str(path), "target": "v", "batch_size": 8},
        "tbptt": {"k1": 16},
        "optim": {"lr": 0.01},
        "train": {"max_steps": 150, "eval_every": 0, "device": "cpu"},
    })
    assert summary.valid_mse < 0.05  # a sine is predictable from its past
