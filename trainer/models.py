"""Recurrent models: an input layer, one fused nn.RNN/LSTM/GRU stack, and a head.

The recurrent stack is always one `nn.LSTM`/`nn.GRU`/`nn.RNN` module, so a window runs
as one fused cuDNN/ATen call (per segment between document resets, see tbptt.py).
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import ModelConfig
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
        return self.rnn(self._dropout(self.encoder(inputs)), state)

    def head(self, outputs: torch.Tensor) -> torch.Tensor:
        """Predictions from recurrent outputs: logits (n, B, C) or values (n, B)."""
        out = self.decoder(self._dropout(outputs))
        return out.squeeze(-1) if self.regression else out

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        # Out of training, dropout is the identity (and draws no random numbers): skipping
        # the call saves its cost per step where steps are one token (generation).
        return self.drop(x) if self.training and self.drop.p else x

    def forward(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        outputs, state = self.recur(inputs, state)
        return self.head(outputs), state


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
