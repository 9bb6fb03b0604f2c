"""The engine's gradients equal references written straight from SPEC §1.

The reference runs one step at a time and remembers, for every position, the state of
its latest computation; an update at boundary τ starts its graph at g = τ − k2 from that
remembered state (taken as a constant), recomputes the overlap with the current
parameters and takes the loss on steps (τ − min(k1, k2), τ]. Every update's gradients are
compared in float64 while SGD moves the parameters, so the k2 > k1 recomputation and the
carried state across windows and epochs are both exercised.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from trainer.config import parse_config
from trainer.data import IGNORE, Data, Streams, Task
from trainer.loop import Trainer
from trainer.tbptt import detach, plan_update

VOCAB, LR = 5, 0.5


pytestmark = pytest.mark.usefixtures("float64")  # tests/trainer/conftest.py


def make_streams(length: int, batch: int, seed: int = 0, doc_prob: float = 0.0) -> Streams:
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randint(VOCAB, (length, batch), generator=gen)
    targets = torch.randint(VOCAB, (length, batch), generator=gen)
    targets[torch.rand(length, batch, generator=gen) < 0.2] = IGNORE  # some steps unscored
    starts = torch.rand(length, batch, generator=gen) < doc_prob
    return Streams(inputs, targets, targets != IGNORE, starts)


def make_trainer(streams: Streams, cell: str = "lstm", **tbptt) -> Trainer:
    documents = tbptt.get("reset_on") == "document"
    config = parse_config({
        "model": {"cell": cell, "hidden_size": 6, "num_layers": 2, "embedding_dim": 4},
        # The data section only has to validate: the streams are given directly.
        "data": {"kind": "text", "path": "unused"} if documents else {"kind": "recall", "vocab": VOCAB},
        "tbptt": tbptt,
        "clip": {"mode": "none"},
        "optim": {"name": "sgd", "lr": LR},
        "train": {"max_steps": 1000, "device": "cpu", "seed": 3},
    })
    task = Task(vocab=VOCAB, features=None, classes=VOCAB, metric="accuracy")
    return Trainer(config, Data(task, streams, streams), torch.device("cpu"))


class Reference:
    """SPEC §1, one step at a time."""

    def __init__(self, model, streams: Streams, k1: int, k2: int, reset: bool = False):
        self.model, self.s, self.k1, self.k2, self.reset = model, streams, k1, k2, reset
        self.states = {0: model.initial_state(streams.batch_size, torch.device("cpu"))}
        self.p = 0

    def step(self, t: int, h):
        if self.reset:
            keep = (~self.s.starts[t]).to(torch.float64).view(1, -1, 1)
            h = tuple(x * keep for x in h) if isinstance(h, tuple) else h * keep
        out, h = self.model.recur(self.s.inputs[t : t + 1], h)
        return self.model.head(out)[0], h

    def update(self) -> list[torch.Tensor]:
        k1, k2, p, T = self.k1, self.k2, self.p, self.s.length
        tau = min(p + k1, T)
        # g = τ − k2, not before the stream start; a short last window reaches back no
        # further than a regular window's overlap (docs/tbptt.md).
        g = max(tau - k2, p - max(0, k2 - k1), 0)
        h = self.states[p]
        with torch.no_grad():  # k2 < k1: steps p+1 .. g only advance the state
            for t in range(p, g):
                _, h = self.step(t, h)
                self.states[t + 1] = h
        h = detach(self.states[g])
        loss, count = 0.0, 0
        for t in range(g, tau):
            logits, h = self.step(t, h)
            self.states[t + 1] = detach(h)
            if t >= tau - min(tau - p, k2):
                loss = loss + F.cross_entropy(logits, self.s.targets[t], ignore_index=IGNORE, reduction="sum")
                count += int(self.s.scored[t].sum())
        self.model.zero_grad(set_to_none=True)
        (loss / count).backward()
        grads = [p.grad.clone() for p in self.model.parameters()]
        with torch.no_grad():
            for param in self.model.parameters():
                param -= LR * param.grad
        self.p = tau
        if tau == T:  # next epoch: the stream starts again with the carried state
            self.states, self.p = {0: self.states[T]}, 0
        return grads


def engine_grads(trainer: Trainer) -> list[torch.Tensor]:
    trainer.update()
    return [p.grad.clone() for p in trainer.model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], context: str) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9, msg=lambda m: f"{context}: {m}")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_k_equal_to_length_is_full_bptt(cell):
    streams = make_streams(24, 3)
    trainer = make_trainer(streams, cell=cell, k1=24, k2=24)
    model = copy.deepcopy(trainer.model)
    out, _ = model(streams.inputs, model.initial_state(3, torch.device("cpu")))
    loss = F.cross_entropy(out.reshape(-1, VOCAB), streams.targets.reshape(-1), ignore_index=IGNORE)
    loss.backward()
    assert_same(engine_grads(trainer), [p.grad for p in model.parameters()], "full BPTT")


def test_mode_full_is_one_update_over_the_stream():
    streams = make_streams(20, 2)
    full, truncated = make_trainer(streams, mode="full"), make_trainer(streams, k1=20, k2=20)
    assert_same(engine_grads(full), engine_grads(truncated), "mode full")


@pytest.mark.parametrize(
    "k1,k2,length",
    [
        (4, 4, 24),  # classic TBPTT(k, k)
        (3, 7, 24),  # k2 > k1: the overlap is recomputed with current parameters
        (2, 9, 20),  # k2 > 2·k1
        (6, 2, 24),  # k2 < k1: steps before g only advance the state
        (5, 1, 20),
        (5, 8, 23),  # a short last window, then a new epoch
    ],
)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_updates_match_per_step_reference(cell, k1, k2, length):
    streams = make_streams(length, 3, seed=k1 * 10 + k2)
    trainer = make_trainer(streams, cell=cell, k1=k1, k2=k2)
    reference = Reference(copy.deepcopy(trainer.model), streams, k1, k2)
    updates = 2 * -(-length // k1) + 1  # two epochs and a bit
    for n in range(updates):
        assert_same(engine_grads(trainer), reference.update(), f"update {n + 1}")


@pytest.mark.parametrize("k1,k2", [(4, 4), (3, 8), (8, 3)])
def test_per_stream_resets_match_reference(k1, k2):
    streams = make_streams(24, 4, seed=7, doc_prob=0.15)
    trainer = make_trainer(streams, k1=k1, k2=k2, reset_on="document")
    reference = Reference(copy.deepcopy(trainer.model), streams, k1, k2, reset=True)
    for n in range(10):
        assert_same(engine_grads(trainer), reference.update(), f"update {n + 1}")


def test_resets_equal_documents_run_separately():
    streams = make_streams(30, 4, seed=11, doc_prob=0.12)
    trainer = make_trainer(streams, k1=30, k2=30, reset_on="document")
    model = copy.deepcopy(trainer.model)
    total, count = 0.0, 0
    for b in range(streams.batch_size):
        cuts = [0, *streams.starts[:, b].nonzero().flatten().tolist(), streams.length]
        for a, e in zip(cuts[:-1], cuts[1:]):
            if a == e:
                continue
            out, _ = model(streams.inputs[a:e, b : b + 1], model.initial_state(1, torch.device("cpu")))
            total = total + F.cross_entropy(out[:, 0], streams.targets[a:e, b], ignore_index=IGNORE, reduction="sum")
            count += int(streams.scored[a:e, b].sum())
    assert len(cuts) > 3  # the data really has documents
    (total / count).backward()
    assert_same(engine_grads(trainer), [p.grad for p in model.parameters()], "documents")


def test_reset_windows_split_the_fused_call_only_at_document_starts():
    streams = make_streams(32, 3, seed=5, doc_prob=0.05)
    trainer = make_trainer(streams, k1=16, k2=16, reset_on="document")
    window = streams.window(0, 16)
    cuts = trainer.runner.cuts(window, 0, 16, 0)
    expected = {0, 16} | {int(t) for t in window.starts.any(dim=1).nonzero().flatten() if t > 0}
    assert cuts == sorted(expected)
    assert make_trainer(streams, k1=16, k2=16).runner.cuts(window, 0, 16, 0) == [0, 16]


@pytest.mark.parametrize("k1,k2,every", [(8, 8, 3), (4, 10, 2), (10, 4, 3), (12, 12, 1)])
def test_activation_checkpointing_changes_nothing(k1, k2, every):
    streams = make_streams(24, 3, seed=2, doc_prob=0.1)
    plain = make_trainer(streams, k1=k1, k2=k2, reset_on="document")
    chunked = make_trainer(streams, k1=k1, k2=k2, reset_on="document", checkpoint_every=every)
    for n in range(8):
        assert_same(engine_grads(chunked), engine_grads(plain), f"update {n + 1}")
    for a, b in zip(plain.model.parameters(), chunked.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_plan_rule():
    # k2 > k1: the graph reaches k2 back from τ and keeps the state k2 − k1 before τ.
    plan = plan_update(p=8, kept=5, k1=4, k2=7, length=100)
    assert (plan.graph, plan.loss, plan.end, plan.keep) == (5, 8, 12, 9)
    # k2 < k1: the graph starts after the window start, the loss covers only the graph.
    plan = plan_update(p=8, kept=8, k1=6, k2=2, length=100)
    assert (plan.graph, plan.loss, plan.end, plan.keep) == (12, 12, 14, 14)
    # the stream's start bounds the graph; the end of the stream keeps its last state.
    plan = plan_update(p=0, kept=0, k1=2, k2=10, length=100)
    assert (plan.graph, plan.loss, plan.end, plan.keep) == (0, 0, 2, 0)
    plan = plan_update(p=96, kept=93, k1=4, k2=7, length=98)
    assert (plan.graph, plan.loss, plan.end, plan.keep) == (93, 96, 98, 98)


@pytest.mark.parametrize("k1", [1, 2, 3, 5])
@pytest.mark.parametrize("k2", [1, 2, 4, 7])
@pytest.mark.parametrize("length", [1, 6, 13])
def test_plan_rule_follows_the_spec_over_a_whole_stream(k1, k2, length):
    """SPEC §1, window after window from the stream's start: each update ends at τ (k1 on,
    or the stream's end), its graph starts k2 back (never before the stream's start, nor
    before the state the last update kept), its loss covers (τ − min(k1, k2), τ] inside the
    window, and the windows tile the stream."""
    p = kept = 0
    scored: list[int] = []
    while p < length:
        plan = plan_update(p, kept, k1, k2, length)
        tau = min(p + k1, length)
        assert plan.end == tau
        assert plan.graph == (max(tau - k2, 0) if tau == p + k1 else max(tau - k2, kept))
        assert plan.loss == max(p, tau - min(k1, k2))
        assert plan.graph <= plan.loss <= plan.end and plan.graph <= plan.keep <= plan.end
        if tau + k1 <= length:  # the next update's graph, k2 back from its τ, finds its start kept
            assert plan.keep <= max(tau + k1 - k2, 0)
        scored += range(plan.loss, plan.end)
        p, kept = plan.end, plan.keep
    assert scored == sorted(set(scored))  # no step scored twice
    if k2 >= k1:
        assert scored == list(range(length))  # every step scored once
