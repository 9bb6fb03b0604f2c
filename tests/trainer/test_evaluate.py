"""Validation numbers equal a reference that runs one step at a time: the mean loss and
accuracy over scored steps, from a zero state carried across chunks, reset at each
stream's document starts. Evaluation shares the segment code with training
(`Runner.segment`), so this also pins that sharing down."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ModelConfig
from trainer.data import IGNORE, Streams, Task
from trainer.models import RNNModel
from trainer.tbptt import Runner, evaluate

VOCAB, FEATURES = 5, 3
CLASSES = Task(vocab=VOCAB, features=None, classes=VOCAB, metric="accuracy")
VALUES = Task(vocab=None, features=FEATURES, classes=None, metric="mse")


pytestmark = pytest.mark.usefixtures("float64")  # tests/trainer/conftest.py


def make_streams(task: Task, length: int, batch: int, doc_prob: float, seed: int = 0) -> Streams:
    gen = torch.Generator().manual_seed(seed)
    if task.classes:
        inputs = torch.randint(VOCAB, (length, batch), generator=gen)
        targets = torch.randint(VOCAB, (length, batch), generator=gen)
        targets[torch.rand(length, batch, generator=gen) < 0.2] = IGNORE
        scored = targets != IGNORE
    else:
        inputs = torch.randn(length, batch, FEATURES, generator=gen)
        targets = torch.randn(length, batch, generator=gen)
        scored = torch.rand(length, batch, generator=gen) > 0.3
        targets = targets * scored
    starts = torch.rand(length, batch, generator=gen) < doc_prob
    return Streams(inputs, targets, scored, starts)


def reference(model: RNNModel, streams: Streams, reset: bool) -> dict[str, float]:
    model.eval()
    state = model.initial_state(streams.batch_size, torch.device("cpu"))
    loss, correct, count = 0.0, 0.0, 0.0
    with torch.no_grad():
        for t in range(streams.length):
            if reset:
                keep = (~streams.starts[t]).to(torch.float64).view(1, -1, 1)
                state = tuple(s * keep for s in state) if isinstance(state, tuple) else state * keep
            out, state = model.recur(streams.inputs[t : t + 1], state)
            pred, target, scored = model.head(out)[0], streams.targets[t], streams.scored[t]
            if pred.dim() == 2:
                loss += F.cross_entropy(pred, target, ignore_index=IGNORE, reduction="sum").item()
                correct += ((pred.argmax(-1) == target) & scored).sum().item()
            else:
                loss += ((pred - target) ** 2 * scored).sum().item()
            count += scored.sum().item()
    return {"loss": loss / count, "correct": correct / count, "count": count}


@pytest.mark.parametrize("task", [CLASSES, VALUES], ids=["classes", "values"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("reset,chunk", [(False, 512), (False, 7), (True, 512), (True, 5)])
def test_evaluate_matches_a_per_step_reference(task, cell, reset, chunk):
    torch.manual_seed(4)
    model = RNNModel(ModelConfig(cell=cell, hidden_size=6, num_layers=2, embedding_dim=4, dropout=0.3), task)
    streams = make_streams(task, 37, 3, doc_prob=0.15 if reset else 0.0)
    runner = Runner(model, reset_on_document=reset)
    got = evaluate(runner, streams, torch.device("cpu"), chunk=chunk)
    assert model.training  # evaluation leaves the model's mode as it found it
    want = reference(model, streams, reset)
    assert got["count"] == want["count"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-10)
    assert got["correct"] == pytest.approx(want["correct"], rel=1e-12)
