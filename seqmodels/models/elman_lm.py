"""Plain (Elman) recurrent language model: h_t = tanh(W x_t + U h_{t-1} + b).

The simplest recurrent baseline beside LSTM and GRU (same embedding, dropout, tied head and
training; only the recurrent cell differs), so its bits per character show what gating buys.
"""

from __future__ import annotations

from typing import Literal

import torch.nn as nn

from seqmodels.models.recurrent_lm import RecurrentLMArchitecture, RecurrentLMFamily


class ElmanLMArchitecture(RecurrentLMArchitecture):
    cell: Literal["rnn"] = "rnn"  # stated for readability: this family is the plain RNN
    nonlinearity: Literal["tanh", "relu"] = "tanh"


class ElmanLMFamily(RecurrentLMFamily):
    """A stack of plain tanh (or ReLU) RNN layers."""

    Architecture = ElmanLMArchitecture

    def __init__(self) -> None:
        self.cell = "rnn"

    def make_rnn(self, arch: ElmanLMArchitecture) -> nn.RNNBase:
        return nn.RNN(
            arch.emb_dim,
            arch.hidden_size,
            arch.n_layers,
            nonlinearity=arch.nonlinearity,
            batch_first=True,
            dropout=arch.dropout if arch.n_layers > 1 else 0.0,
        )
