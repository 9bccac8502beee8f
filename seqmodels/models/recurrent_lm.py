"""Recurrent language models: LSTM and GRU (this module) and, through `make_rnn`, any other
torch recurrent layer (the plain Elman RNN in elman_lm.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from seqmodels import PAD_ID
from seqmodels.models.family import NeuralLMFamily
from seqmodels.models.layers import run_rnn
from seqmodels.settings import Settings
from seqmodels.training.flops import matmul_params


class RecurrentLMArchitecture(Settings):
    emb_dim: int = Field(default=512, gt=0)
    hidden_size: int = Field(default=512, gt=0)
    n_layers: int = Field(default=2, gt=0)
    dropout: float = Field(default=0.2, ge=0, lt=1)
    tie_embeddings: bool = True  # only possible when emb_dim == hidden_size


class RecurrentLanguageModel(nn.Module):
    """Embedding, a stack of recurrent layers, a linear head (tied to the embedding when the
    sizes match: Press & Wolf 2017). The recurrent layer is given by the family."""

    def __init__(
        self, arch: RecurrentLMArchitecture, vocab_size: int, make_rnn: Callable[[], nn.RNNBase]
    ):
        super().__init__()
        self.arch = arch
        self.emb = nn.Embedding(vocab_size, arch.emb_dim, padding_idx=PAD_ID)
        self.drop = nn.Dropout(arch.dropout)
        # Made here, after the embedding: seeded initialisation depends on creation order.
        self.rnn = make_rnn()
        self.head = nn.Linear(arch.hidden_size, vocab_size)
        nn.init.uniform_(self.emb.weight, -0.1, 0.1)
        if arch.tie_embeddings and arch.emb_dim == arch.hidden_size:
            self.head.weight = self.emb.weight

    # The recurrent state carries any amount of context.
    max_context = None

    def forward(self, idx: torch.Tensor, state=None) -> tuple[torch.Tensor, object]:
        """idx (B, T) -> logits (B, T, V) and the final recurrent state (carry it on)."""
        x = self.drop(self.emb(idx))
        out, state = run_rnn(self.rnn, x, state)
        return self.head(self.drop(out)), state

    def flops_per_token(self, context: float) -> float:
        enc, other = matmul_params(self)
        return 6.0 * (enc + other)


class RecurrentLMFamily(NeuralLMFamily):
    """An LSTM or GRU language model; `cell` is fixed per registered family."""

    Architecture = RecurrentLMArchitecture

    CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}

    def __init__(self, cell: Literal["lstm", "gru"]):
        if cell not in self.CELLS:
            raise ValueError(f"unknown recurrent cell {cell!r}; use one of {sorted(self.CELLS)}")
        self.cell = cell

    def make_rnn(self, arch: RecurrentLMArchitecture) -> nn.RNNBase:
        return self.CELLS[self.cell](
            arch.emb_dim,
            arch.hidden_size,
            arch.n_layers,
            batch_first=True,
            dropout=arch.dropout if arch.n_layers > 1 else 0.0,
        )

    def build(self, arch: RecurrentLMArchitecture, vocab_size: int) -> nn.Module:
        return RecurrentLanguageModel(arch, vocab_size, lambda: self.make_rnn(arch))
