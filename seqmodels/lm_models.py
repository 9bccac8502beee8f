"""Neural language models: an LSTM/GRU LM and a decoder-only Transformer LM.

Both models map token ids (B, T) to next-token logits (B, T, V) and return a
recurrent state / key-value cache so that scoring and sampling can continue a
sequence without recomputing it. The attention and feed-forward layers defined
here are reused by the Transformer encoder-decoder in seq2seq_models.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqmodels import PAD_ID

# One (key, value) pair per layer, each shaped (B, n_head, T_past, head_dim).
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RNNLMConfig:
    vocab_size: int = 2000
    cell: str = "lstm"  # "lstm" | "gru"
    emb_dim: int = 512
    hidden_size: int = 512
    n_layers: int = 2
    dropout: float = 0.2
    tie_embeddings: bool = True  # only possible when emb_dim == hidden_size


@dataclass
class TransformerLMConfig:
    vocab_size: int = 2000
    block_size: int = 128  # maximum context (learned positions)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    d_ff: int = 1024
    dropout: float = 0.1


def run_rnn(rnn: nn.RNNBase, x, state=None):
    """Run a torch RNN in float32 even under autocast.

    cuDNN LSTM/GRU kernels do not support bf16 on many versions, and the recurrent
    matmuls are cheap relative to the output softmax, so we keep them in fp32.
    """
    device_type = next(rnn.parameters()).device.type  # x may be a PackedSequence
    with torch.autocast(device_type=device_type, enabled=False):
        if state is not None:
            state = tuple(s.float() for s in state) if isinstance(state, tuple) else state.float()
        return rnn(x.float(), state)


class RNNLanguageModel(nn.Module):
    def __init__(self, config: RNNLMConfig):
        super().__init__()
        if config.cell not in ("lstm", "gru"):
            raise ValueError(f"unknown cell {config.cell!r}; use 'lstm' or 'gru'")
        self.config = config
        rnn_cls = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.emb = nn.Embedding(config.vocab_size, config.emb_dim, padding_idx=PAD_ID)
        self.drop = nn.Dropout(config.dropout)
        self.rnn = rnn_cls(
            config.emb_dim,
            config.hidden_size,
            config.n_layers,
            batch_first=True,
            dropout=config.dropout if config.n_layers > 1 else 0.0,
        )
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        nn.init.uniform_(self.emb.weight, -0.1, 0.1)
        if config.tie_embeddings and config.emb_dim == config.hidden_size:
            self.head.weight = self.emb.weight  # Press & Wolf (2017) weight tying

    def forward(self, idx: torch.Tensor, state=None) -> tuple[torch.Tensor, object]:
        """idx (B, T) -> logits (B, T, V) and the final recurrent state (carry it on)."""
        x = self.drop(self.emb(idx))
        out, state = run_rnn(self.rnn, x, state)
        return self.head(self.drop(out)), state


class MultiHeadAttention(nn.Module):
    """Attention whose keys/values are projected separately, so they can be cached.

    Self-attention: kv = project_kv(x). Cross-attention: kv = project_kv(memory),
    computed once per source sentence.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        assert d_model % n_head == 0, "d_model must be divisible by n_head"
        self.n_head = n_head
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv_proj(x).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(
        self,
        x: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q = self._heads(self.q_proj(x))
        k, v = kv
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.out_proj(y))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


def self_attention(
    attn: MultiHeadAttention,
    h: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Causal self-attention of new positions h over past + new keys/values."""
    k, v = attn.project_kv(h)
    n_past = 0
    if past is not None and past[0].size(2) > 0:
        n_past = past[0].size(2)
        k = torch.cat([past[0], k], dim=2)
        v = torch.cat([past[1], v], dim=2)
    T = h.size(1)
    if n_past == 0:
        y = attn(h, (k, v), is_causal=T > 1)
    elif T == 1:
        y = attn(h, (k, v))  # one new query may see everything before it
    else:
        # is_causal would align the mask top-left; with a cache the new queries sit at the end.
        mask = torch.ones(T, n_past + T, dtype=torch.bool, device=h.device).tril(diagonal=n_past)
        y = attn(h, (k, v), attn_mask=mask)
    return y, (k, v)


class DecoderBlock(nn.Module):
    """Pre-norm Transformer block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff, dropout)

    def forward(self, x, past=None):
        y, kv = self_attention(self.attn, self.ln1(x), past)
        x = x + y
        x = x + self.ffn(self.ln2(x))
        return x, kv


def init_transformer_weights(module: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2 style init; residual output projections scaled down by depth."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            if name.endswith("bias"):
                nn.init.zeros_(p)
            continue
        residual = name.endswith(("attn.out_proj.weight", "ffn.proj.weight"))
        s = std / math.sqrt(2 * n_layers) if residual else std
        nn.init.normal_(p, mean=0.0, std=s)


class TransformerLanguageModel(nn.Module):
    def __init__(self, config: TransformerLMConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            DecoderBlock(config.d_model, config.n_head, config.d_ff, config.dropout)
            for _ in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_transformer_weights(self, config.n_layer)
        self.head.weight = self.tok_emb.weight  # tied input/output embeddings

    def forward(
        self, idx: torch.Tensor, cache: KVCache | None = None, use_cache: bool = False
    ) -> tuple[torch.Tensor, KVCache | None]:
        """idx (B, T) -> logits (B, T, V). With a cache, idx are the tokens after it."""
        n_past = cache[0][0].size(2) if cache else 0
        T = idx.size(1)
        if n_past + T > self.config.block_size:
            raise ValueError(f"sequence length {n_past + T} > block_size {self.config.block_size}")
        pos = torch.arange(n_past, n_past + T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cache[i] if cache else None)
            new_cache.append(kv)
        logits = self.head(self.ln_f(x))
        return logits, (new_cache if use_cache else None)
