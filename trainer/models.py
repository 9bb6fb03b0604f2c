"""Recurrent models: an input layer, one fused nn.RNN/LSTM/GRU stack, and a head.

The recurrent stack is always one `nn.LSTM`/`nn.GRU`/`nn.RNN` module, so a window runs
as one fused cuDNN/ATen call (per segment between document resets, see tbptt.py).
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import JobConfig, ModelConfig
from trainer.data import Task

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class RNNModel(nn.Module):
    def __init__(self, cfg: ModelConfig, task: Task):
        super().__init__()
        self.cell = cfg.cell
        self.drop = nn.Dropout(cfg.dropout)
        if task.vocab is not None:
            self.encoder: nn.Module = nn.Embedding(task.vocab, cfg.embedding_dim)
            input_size = cfg.embedding_dim
        else:
            self.encoder = nn.Identity()
            input_size = task.features
        rnn_dropout = cfg.dropout if cfg.num_layers > 1 else 0.0
        if cfg.cell == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(input_size, cfg.hidden_size, cfg.num_layers, dropout=rnn_dropout)
        elif cfg.cell == "gru":
            self.rnn = nn.GRU(input_size, cfg.hidden_size, cfg.num_layers, dropout=rnn_dropout)
        else:
            nonlinearity = cfg.cell.removeprefix("rnn_")
            self.rnn = nn.RNN(input_size, cfg.hidden_size, cfg.num_layers, nonlinearity=nonlinearity, dropout=rnn_dropout)
        self.decoder = nn.Linear(cfg.hidden_size, task.classes or 1)
        self.regression = task.classes is None
        if cfg.tie_weights:
            # "Using the Output Embedding to Improve Language Models" (Press & Wolf, 2016)
            self.decoder.weight = self.encoder.weight
        self.hidden_size, self.num_layers = cfg.hidden_size, cfg.num_layers

    def initial_state(self, batch_size: int, device: torch.device) -> State:
        dtype = self.decoder.weight.dtype
        zeros = torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device, dtype=dtype)
        return (zeros, zeros.clone()) if self.cell == "lstm" else zeros

    def recur(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Run the recurrent stack over (n, B, ...) inputs; returns (n, B, H) outputs."""
        return self.rnn(self.drop(self.encoder(inputs)), state)

    def head(self, outputs: torch.Tensor) -> torch.Tensor:
        """Predictions from recurrent outputs: logits (n, B, C) or values (n, B)."""
        out = self.decoder(self.drop(outputs))
        return out.squeeze(-1) if self.regression else out

    def forward(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        outputs, state = self.recur(inputs, state)
        return self.head(outputs), state


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def parameter_count(config: JobConfig, vocab: int | None = None) -> int:
    """Parameters of the model a job config builds, without building it.

    `vocab` is the text vocabulary when known; for text jobs without it, the embedding
    and output layers are left out (the caller learns their size only from the data).
    """
    m, data = config.model, config.data
    gates = {"lstm": 4, "gru": 3}.get(m.cell, 1)
    if data.kind == "recall":
        vocab = data.vocab
    tokens = data.kind in ("recall", "text")
    input_size = m.embedding_dim if tokens else (2 if data.kind == "adding" else len(data.columns or []) or 1)
    total = 0
    for layer in range(m.num_layers):
        size_in = input_size if layer == 0 else m.hidden_size
        total += gates * m.hidden_size * (size_in + m.hidden_size + 2)
    classes = vocab if tokens else 1
    if tokens and vocab is None:
        return total
    total += (classes or 1) * (m.hidden_size + 1)
    if tokens and not m.tie_weights:
        total += vocab * m.embedding_dim
    return total
