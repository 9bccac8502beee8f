"""Transformer encoder-decoder (Vaswani et al. 2017, pre-LN variant), shared embeddings.

Implements the decoding interface of every seq2seq family (see models/family.py).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from seqmodels import PAD_ID
from seqmodels.models.family import Seq2SeqFamily
from seqmodels.models.layers import (
    FeedForward,
    MultiHeadAttention,
    init_transformer_weights,
    linear,
    self_attention,
    sinusoidal_table,
)
from seqmodels.settings import Settings
from seqmodels.training.flops import matmul_params, seq2seq_flops_per_token

ENCODER_PREFIXES = ("enc_", "encoder")


class TransformerSeq2SeqArchitecture(Settings):
    d_model: int = Field(default=256, gt=0)
    n_head: int = Field(default=4, gt=0)
    n_enc_layers: int = Field(default=3, gt=0)
    n_dec_layers: int = Field(default=3, gt=0)
    d_ff: int = Field(default=1024, gt=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"
    max_positions: int = Field(default=256, gt=1)  # longest source/target the model accepts
    share_embeddings: bool = True  # tie source, target and output embeddings (joint vocab)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerSeq2SeqArchitecture:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        return self


class EncoderLayer(nn.Module):
    def __init__(self, c: TransformerSeq2SeqArchitecture):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.d_model)
        self.attn = MultiHeadAttention(c.d_model, c.n_head, c.dropout)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.ffn = FeedForward(c.d_model, c.d_ff, c.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, self.attn.project_kv(h), attn_mask=attn_mask)
        return x + self.ffn(self.ln2(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: TransformerSeq2SeqArchitecture):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.d_model)
        self.self_attn = MultiHeadAttention(c.d_model, c.n_head, c.dropout)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.cross_attn = MultiHeadAttention(c.d_model, c.n_head, c.dropout)
        self.ln3 = nn.LayerNorm(c.d_model)
        self.ffn = FeedForward(c.d_model, c.d_ff, c.dropout)

    def forward(self, x, past, cross_kv, cross_mask, rows=None):
        y, kv = self_attention(self.self_attn, self.ln1(x), past, rows)
        x = x + y
        x = x + self.cross_attn(self.ln2(x), cross_kv, attn_mask=cross_mask)
        x = x + self.ffn(self.ln3(x))
        return x, kv


class TransformerSeq2Seq(nn.Module):
    """Pre-norm Transformer encoder-decoder (Vaswani et al. 2017, pre-LN variant)."""

    def __init__(self, arch: TransformerSeq2SeqArchitecture, vocab_size: int):
        super().__init__()
        c = arch
        self.arch = c
        self.tgt_emb = nn.Embedding(vocab_size, c.d_model, padding_idx=PAD_ID)
        self.src_emb = (
            self.tgt_emb
            if c.share_embeddings
            else nn.Embedding(vocab_size, c.d_model, padding_idx=PAD_ID)
        )
        if c.positions == "learned":
            self.pos_emb = nn.Embedding(c.max_positions, c.d_model)
        else:
            table = sinusoidal_table(c.max_positions, c.d_model)
            self.register_buffer("pos_table", table, persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.enc_layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.n_enc_layers))
        self.enc_ln = nn.LayerNorm(c.d_model)
        self.dec_layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.n_dec_layers))
        self.dec_ln = nn.LayerNorm(c.d_model)
        init_transformer_weights(self, c.n_enc_layers + c.n_dec_layers)
        # Embeddings ~ N(0, d^-1/2) and scaled by sqrt(d) (fairseq): unit-variance inputs that
        # match the sinusoid amplitude, and well-scaled logits from the tied output matrix.
        for emb in {self.src_emb, self.tgt_emb}:
            nn.init.normal_(emb.weight, mean=0.0, std=c.d_model**-0.5)
            with torch.no_grad():
                emb.weight[PAD_ID].zero_()
        self.emb_scale = math.sqrt(c.d_model)

    def _embed(self, emb: nn.Embedding, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = tokens.size(1)
        if start + T > self.arch.max_positions:
            raise ValueError(f"length {start + T} > max_positions {self.arch.max_positions}")
        if self.arch.positions == "learned":
            pos = self.pos_emb(torch.arange(start, start + T, device=tokens.device))
        else:
            pos = self.pos_table[start : start + T]
        return self.drop(emb(tokens) * self.emb_scale + pos)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> dict:
        x = self._embed(self.src_emb, src)
        attn_mask = src_mask[:, None, None, :]  # (B, 1, 1, S): keys that may be attended
        for layer in self.enc_layers:
            x = layer(x, attn_mask)
        enc = self.enc_ln(x)
        # Cross-attention keys/values are computed once here, not at every decoder step.
        cross = [layer.cross_attn.project_kv(enc) for layer in self.dec_layers]
        return {
            "mask": src_mask,
            "cross_k": [k for k, _ in cross],
            "cross_v": [v for _, v in cross],
        }

    def _decode(self, tgt: torch.Tensor, state: dict | None, memory: dict):
        start = state["self_k"][0].size(2) if state else 0
        x = self._embed(self.tgt_emb, tgt, start)
        cross_mask = memory["mask"][:, None, None, :]
        new_k, new_v = [], []
        for i, layer in enumerate(self.dec_layers):
            past = (state["self_k"][i], state["self_v"][i]) if state else None
            cross_kv = (memory["cross_k"][i], memory["cross_v"][i])
            x, (k, v) = layer(x, past, cross_kv, cross_mask, state["rows"] if state else None)
            new_k.append(k)
            new_v.append(v)
        logits = linear(self.dec_ln(x), self.tgt_emb.weight)
        return logits, {"self_k": new_k, "self_v": new_v, "rows": None}

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor):
        logits, _ = self._decode(tgt_in, None, self.encode(src, src_mask))
        return logits

    def init_state(self, memory: dict) -> dict:
        k = memory["cross_k"][0]
        empty = k.new_zeros(k.size(0), k.size(1), 0, k.size(3))
        n = self.arch.n_dec_layers
        return {"self_k": [empty] * n, "self_v": [empty] * n, "rows": None}

    def decode_step(self, tokens: torch.Tensor, state: dict, memory: dict):
        """tokens (N,) -> logits (N, V) for the next position, and the grown KV cache."""
        logits, state = self._decode(tokens[:, None], state, memory)
        return logits[:, 0], state

    def reorder_state(self, state: dict, index: torch.Tensor) -> dict:
        # Only the rows are recorded: the next decode_step gathers them as it appends its
        # position (layers.append_positions), one copy of the cache instead of two.
        rows = index if state["rows"] is None else state["rows"][index]
        return {**state, "rows": rows}

    @property
    def max_positions(self) -> int:
        return self.arch.max_positions

    def flops_per_token(self, src_len: float, tgt_len: float) -> float:
        """6N (encoder scaled by the length ratio; the tied output matrix counted) plus
        encoder self-attention and decoder self- and cross-attention."""
        enc, other = matmul_params(self, ENCODER_PREFIXES)
        other += self.tgt_emb.weight.numel()  # logits are linear(x, tgt_emb.weight)
        flops = seq2seq_flops_per_token(enc, other, src_len, tgt_len)
        c, ratio = self.arch, src_len / max(tgt_len, 1e-9)
        flops += 12.0 * c.d_model * c.n_enc_layers * src_len * ratio  # encoder self-attention
        flops += 12.0 * c.d_model * c.n_dec_layers * (tgt_len + src_len)  # decoder self+cross
        return flops


class TransformerSeq2SeqFamily(Seq2SeqFamily):
    """A pre-norm Transformer encoder-decoder."""

    Architecture = TransformerSeq2SeqArchitecture
    ctranslate2_layout = "encoder_decoder"  # seqmodels.models.ct2_export

    def build(self, arch: TransformerSeq2SeqArchitecture, vocab_size: int) -> nn.Module:
        return TransformerSeq2Seq(arch, vocab_size)

    def max_positions(self, arch: TransformerSeq2SeqArchitecture) -> int | None:
        return arch.max_positions
