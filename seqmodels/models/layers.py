"""Building blocks shared by several model families: attention with a cacheable key/value
projection, the Transformer feed-forward and pre-norm block, GPT-2 initialisation, sinusoidal
positions and recurrent layers kept in float32."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# One (key, value) pair per layer, each shaped (B, n_head, T_past, head_dim).
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


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


# oneDNN's fp32 matmul, where this torch build has it. On the 2-core AVX-512 AMD EPYC the
# benchmarks run on, MKL's sgemm (what F.linear calls on the CPU) does not use AVX-512 and
# oneDNN does: the beam-search feed-forward matmul (160 x 512 x 2048) ran at about 200 GFLOP/s
# against 160, and a Transformer-base beam search took 5.78 s instead of 7.20 s (medians of 5
# alternating process pairs, identical outputs). Private to torch (the op Inductor uses for
# CPU linears), hence the fallback.
ONEDNN_LINEAR = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if torch.backends.mkldnn.is_available()
    else None
)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; float32 inference on the CPU (no autograd, no autocast) goes through oneDNN
    instead of the BLAS (same result up to float rounding: another summation order)."""
    if (
        ONEDNN_LINEAR is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    ):
        return ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose CPU inference runs `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MultiHeadAttention(nn.Module):
    """Attention whose keys/values are projected separately, so they can be cached.

    Self-attention: kv = project_kv(x). Cross-attention: kv = project_kv(memory),
    computed once per source sentence.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        assert d_model % n_head == 0, "d_model must be divisible by n_head"
        self.n_head = n_head
        self.q_proj = Linear(d_model, d_model)
        self.kv_proj = Linear(d_model, 2 * d_model)
        self.out_proj = Linear(d_model, d_model)
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
        if T == 1 and not self.training:  # a decoding step
            y = single_query_attention(q, k, v, attn_mask)
            return self.out_proj(y.transpose(1, 2).reshape(B, T, C))
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


def single_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for one query position per row (a decoding step) as two
    batched matmuls, the softmax in float32. On the CPU this is about twice as fast per call
    as scaled_dot_product_attention, whose flash kernel is blocked for many queries (3% of a
    beam search, measured by interleaving the two). attn_mask: bool, True = may attend."""
    scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.float().softmax(-1).to(v.dtype) @ v


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc = Linear(d_model, d_ff)
        self.proj = Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


def append_positions(
    past: torch.Tensor, rows: torch.Tensor | None, new: torch.Tensor
) -> torch.Tensor:
    """torch.cat([past.index_select(0, rows), new], dim=2) with one copy of the past instead
    of two: the cached keys or values (N, n_head, T, head_dim) of the rows that beam search
    kept (`rows`, None: all, in order), then the new positions' (n, n_head, T_new, head_dim).

    Gathering the rows into the grown tensor directly halves the cache traffic of a beam
    search step (reorder, then append, each copying the whole past was a quarter of a CPU
    Transformer-base beam search)."""
    if torch.is_grad_enabled() and (past.requires_grad or new.requires_grad):  # out= has no grad
        return torch.cat([past if rows is None else past.index_select(0, rows), new], dim=2)
    n, H, T, D = new.size(0), past.size(1), past.size(2), past.size(3)
    out = new.new_empty(n, H, T + new.size(2), D)
    if rows is None:
        out[:, :, :T] = past
    else:
        torch.index_select(past, 0, rows, out=out[:, :, :T])
    out[:, :, T:] = new
    return out


def self_attention(
    attn: MultiHeadAttention,
    h: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Causal self-attention of new positions h over past + new keys/values. `rows`: the
    rows of `past` that h continues (beam search's reorder, gathered while appending; None:
    every row, in order)."""
    k, v = attn.project_kv(h)
    n_past = 0
    if past is not None and past[0].size(2) > 0:
        n_past = past[0].size(2)
        k = append_positions(past[0], rows, k)
        v = append_positions(past[1], rows, v)
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


def sinusoidal_table(n_positions: int, d_model: int) -> torch.Tensor:
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    div = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)
    return table
