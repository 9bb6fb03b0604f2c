"""Models: every cell builds and runs; the parameter count a config asks for is exact."""

from __future__ import annotations

import pytest
import torch

from trainer.config import parameter_count, parse_config
from trainer.data import Task
from trainer.models import RNNModel, count_parameters


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
@pytest.mark.parametrize(
    "data,task",
    [
        ({"kind": "recall", "vocab": 11}, Task(vocab=11, features=None, classes=11, metric="accuracy")),
        ({"kind": "adding"}, Task(vocab=None, features=2, classes=None, metric="mse")),
    ],
)
def test_parameter_count_matches_the_built_model(cell, data, task):
    config = parse_config({"data": data, "model": {"cell": cell, "num_layers": 2, "hidden_size": 12, "embedding_dim": 5}})
    model = RNNModel(config.model, task)
    assert parameter_count(config) == count_parameters(model)
    out, state = model(torch.zeros(3, 2, dtype=torch.long) if task.vocab else torch.zeros(3, 2, 2), model.initial_state(2, torch.device("cpu")))
    assert out.shape == ((3, 2, 11) if task.vocab else (3, 2))


def test_tied_weights_share_one_matrix():
    config = parse_config({"data": {"kind": "recall", "vocab": 9}, "model": {"hidden_size": 8, "embedding_dim": 8, "tie_weights": True}})
    model = RNNModel(config.model, Task(vocab=9, features=None, classes=9, metric="accuracy"))
    assert model.decoder.weight is model.encoder.weight
    assert parameter_count(config) == count_parameters(model)
