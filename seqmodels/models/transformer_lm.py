"""Decoder-only Transformer language model (GPT-2 style, pre-norm, tied embeddings)."""

from __future__ import annotations

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from seqmodels.models.family import NeuralLMFamily
from seqmodels.models.layers import DecoderBlock, KVCache, Linear, init_transformer_weights
from seqmodels.settings import Settings
from seqmodels.training.flops import matmul_params


class TransformerLMArchitecture(Settings):
    block_size: int = Field(default=128, gt=0)  # maximum context (learned positions)
    n_layer: int = Field(default=4, gt=0)
    n_head: int = Field(default=4, gt=0)
    d_model: int = Field(default=256, gt=0)
    d_ff: int = Field(default=1024, gt=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerLMArchitecture:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        return self


class TransformerLanguageModel(nn.Module):
    def __init__(self, arch: TransformerLMArchitecture, vocab_size: int):
        super().__init__()
        self.arch = arch
        self.tok_emb = nn.Embedding(vocab_size, arch.d_model)
        self.pos_emb = nn.Embedding(arch.block_size, arch.d_model)
        self.drop = nn.Dropout(arch.dropout)
        self.blocks = nn.ModuleList(
            DecoderBlock(arch.d_model, arch.n_head, arch.d_ff, arch.dropout)
            for _ in range(arch.n_layer)
        )
        self.ln_f = nn.LayerNorm(arch.d_model)
        self.head = Linear(arch.d_model, vocab_size, bias=False)
        init_transformer_weights(self, arch.n_layer)
        self.head.weight = self.tok_emb.weight  # tied input/output embeddings

    @property
    def max_context(self) -> int:
        """Learned absolute positions: the model cannot see more than block_size tokens."""
        return self.arch.block_size

    def forward(
        self, idx: torch.Tensor, state: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """idx (B, T) -> logits (B, T, V) and the key/value cache including idx; with a
        cache (`state`), idx are the tokens after it."""
        n_past = state[0][0].size(2) if state else 0
        T = idx.size(1)
        if n_past + T > self.arch.block_size:
            raise ValueError(f"sequence length {n_past + T} > block_size {self.arch.block_size}")
        pos = torch.arange(n_past, n_past + T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, state[i] if state else None)
            new_cache.append(kv)
        return self.head(self.ln_f(x)), new_cache

    def state_length(self, state: KVCache) -> int:
        return state[0][0].size(2)

    def flops_per_token(self, context: float) -> float:
        """6N plus attention over `context` tokens (see seqmodels.training.flops)."""
        enc, other = matmul_params(self)
        return 6.0 * (enc + other) + 12.0 * self.arch.n_layer * self.arch.d_model * context


class TransformerLMFamily(NeuralLMFamily):
    """A decoder-only Transformer language model."""

    Architecture = TransformerLMArchitecture
    ctranslate2_layout = "decoder"  # seqmodels.models.ct2_export

    def build(self, arch: TransformerLMArchitecture, vocab_size: int) -> nn.Module:
        return TransformerLanguageModel(arch, vocab_size)

    def max_context(self, arch: TransformerLMArchitecture) -> int | None:
        return arch.block_size
