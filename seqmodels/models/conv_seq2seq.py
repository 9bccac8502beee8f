"""Convolutional sequence-to-sequence model (ConvS2S; Gehring et al. 2017).

"Convolutional Sequence to Sequence Learning", following fairseq's `fconv` model:

* Encoder: token + learned position embeddings -> dropout -> linear to `hidden` -> a stack of
  1-D convolutions with gated linear units (GLU) and residual connections scaled by
  sqrt(0.5) -> linear back to `emb_dim`. For attention it returns keys z (the conv output
  projected to `emb_dim`) and values (z + e) * sqrt(0.5), where e is the input embedding.
* Decoder: the same stack with causal convolutions (k - 1 positions of left context) and
  multi-step attention in every layer: the layer state h is projected to `emb_dim`, combined
  with the target embedding g as d = (W h + g) * sqrt(0.5), scored against the keys, softmax
  over real source tokens, and the weighted sum of values is scaled by m * sqrt(1/m)
  (m = number of real source tokens), projected back to `hidden` and added to h (residual,
  * sqrt(0.5)). Then a linear to `emb_dim`, dropout, and the output logits.

Initialisation follows the paper/fairseq: embeddings N(0, 0.1) with the PAD_ID row zeroed;
linear layers N(0, sqrt((1 - p) / fan_in)) where their input went through dropout p, else
N(0, sqrt(1 / fan_in)); GLU convolutions N(0, sqrt(4 (1 - p) / (k * fan_in))); biases zero.
Gradients into the encoder output are scaled by 1 / (2 * number of attention layers).
Weight normalisation (used in the paper) is NOT applied: the model is meant to be trained
with Adam, where it matters little, and plain weights keep checkpoints and compilation simple.

Source padding is ignored exactly: source positions count real tokens (so left or right
padding both give positions 0, 1, ... to the real tokens), encoder states at pad positions
are zeroed before every convolution (the same zeros as the convolution's own padding), the
keys and values are zeroed there, and attention gives pad positions weight 0.

Decoding interface (batch first, masks are bool with True on real tokens), as for the other
seq2seq models of this project:

    memory = model.encode(src, src_mask)        # {"keys", "values", "mask"}, batch first
    state = model.init_state(memory)            # {"conv": [(N, k-1, hidden)] * layers, "pos": (N,)}
    logits, state = model.decode_step(tokens, state, memory)   # (N,) -> (N, V)
    state = model.reorder_state(state, index)   # index_select(0, index) on every tensor
    logits = model(src, src_mask, tgt_in)       # teacher forcing: (B, T) -> (B, T, V)

The decoder state keeps, per decoder layer, the last k - 1 inputs of that layer's
convolution (zeros at the start: the causal left padding) and the next target position, so
a decoding step costs O(layers * k) whatever the target length.
"""

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator

from seqmodels import BOS_ID, EOS_ID, PAD_ID
from seqmodels.models.family import Seq2SeqFamily
from seqmodels.settings import Settings

SQRT_HALF = math.sqrt(0.5)

Memory = dict[str, torch.Tensor]
State = dict[str, Any]  # {"conv": list[Tensor (N, k-1, hidden)], "pos": Tensor (N,)}


class ConvSeq2SeqArchitecture(Settings):
    """Shape of a ConvSeq2Seq model (the vocabulary size is passed to the model separately)."""

    emb_dim: int = Field(default=256, gt=0, description="token/position embedding size")
    hidden: int = Field(default=256, gt=0, description="convolution channels")
    n_enc_layers: int = Field(default=6, gt=0)
    n_dec_layers: int = Field(default=6, gt=0)
    kernel_size: int = Field(default=3, ge=2, description="odd: the encoder pads it centred")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_positions: int = Field(default=256, gt=0, description="longest source/target")
    share_embeddings: bool = Field(
        default=True, description="one table for source, target and output projection"
    )

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, k: int) -> int:
        # Centred encoder padding (k - 1) / 2 on both sides only keeps the length for odd k.
        if k % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {k}")
        return k


class _GradMultiply(torch.autograd.Function):
    """Identity forward; scales the gradient in backward (fairseq's GradMultiply)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def _embedding(num: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    emb = nn.Embedding(num, dim, padding_idx=padding_idx)
    nn.init.normal_(emb.weight, mean=0.0, std=0.1)
    if padding_idx is not None:
        with torch.no_grad():
            emb.weight[padding_idx].zero_()
    return emb


def _linear(n_in: int, n_out: int, dropout: float = 0.0) -> nn.Linear:
    # (1 - dropout) keeps the output variance when the input went through dropout.
    lin = nn.Linear(n_in, n_out)
    nn.init.normal_(lin.weight, mean=0.0, std=math.sqrt((1.0 - dropout) / n_in))
    nn.init.zeros_(lin.bias)
    return lin


class _GLUConv(nn.Module):
    """1-D convolution over time followed by a GLU, on channels-last input.

    No padding: the caller supplies the context (centred zeros in the encoder, the k - 1
    previous inputs in the decoder), so (N, T + k - 1, C) -> (N, T, C).
    """

    def __init__(self, channels: int, kernel_size: int, dropout: float):
        super().__init__()
        # nn.Conv1d's layout: (out = 2 * channels GLU inputs, in, kernel).
        self.weight = nn.Parameter(torch.empty(2 * channels, channels, kernel_size))
        self.bias = nn.Parameter(torch.zeros(2 * channels))
        # The factor 4 compensates the GLU: it halves the variance and the sigmoid gate has
        # derivative 1/4 around 0 (paper 3.5); (1 - dropout) the dropout on the input.
        std = math.sqrt(4.0 * (1.0 - dropout) / (kernel_size * channels))
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv1d(x.transpose(1, 2), self.weight, self.bias)
        return F.glu(y.transpose(1, 2), dim=-1)


class _ConvEncoder(nn.Module):
    """Matmul layers of the encoder (embeddings live in ConvSeq2Seq)."""

    def __init__(self, arch: ConvSeq2SeqArchitecture):
        super().__init__()
        p, k = arch.dropout, arch.kernel_size
        self.drop = nn.Dropout(p)
        self.fc1 = _linear(arch.emb_dim, arch.hidden, dropout=p)
        self.convs = nn.ModuleList(_GLUConv(arch.hidden, k, p) for _ in range(arch.n_enc_layers))
        self.half_width = (k - 1) // 2  # centred: same output length as input (k is odd)
        self.fc2 = _linear(arch.hidden, arch.emb_dim)
        self.grad_scale = 1.0 / (2.0 * arch.n_dec_layers)  # one attention per decoder layer

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """emb (B, S, E) after dropout, mask (B, S) -> keys, values (B, S, E), zero at pads."""
        pad = ~mask[..., None]
        x = self.fc1(emb)
        for conv in self.convs:
            residual = x
            # Zero pad positions so they look like the conv's own zero padding: a source
            # gives the same states however much padding surrounds it.
            x = self.drop(x.masked_fill(pad, 0.0))
            x = F.pad(x, (0, 0, self.half_width, self.half_width))
            x = (conv(x) + residual) * SQRT_HALF
        keys = self.fc2(x).masked_fill(pad, 0.0)
        # The encoder gets gradients from every attention layer; scale them down (paper 3.4).
        keys = _GradMultiply.apply(keys, self.grad_scale)
        values = ((keys + emb) * SQRT_HALF).masked_fill(pad, 0.0)
        return keys, values


class _DecoderLayer(nn.Module):
    """Causal GLU convolution + multi-step attention, both with scaled residuals."""

    def __init__(self, arch: ConvSeq2SeqArchitecture):
        super().__init__()
        self.context = arch.kernel_size - 1
        self.drop = nn.Dropout(arch.dropout)
        # Causal: the caller supplies the k - 1 previous inputs (zeros at the start).
        self.conv = _GLUConv(arch.hidden, arch.kernel_size, arch.dropout)
        self.attn_in = _linear(arch.hidden, arch.emb_dim)
        self.attn_out = _linear(arch.emb_dim, arch.hidden)

    def forward(
        self,
        x: torch.Tensor,
        past: torch.Tensor,
        g: torch.Tensor,
        memory: Memory,
        scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, T, H) layer input, past (N, k-1, H) previous conv inputs, g (N, T, E) target
        embeddings -> layer output (N, T, H) and the last k-1 conv inputs."""
        residual = x
        window = torch.cat([past, self.drop(x)], dim=1)  # (N, k-1+T, H)
        h = self.conv(window)  # (N, T, H): output t sees inputs t-k+1 .. t
        h = self._attend(h, g, memory, scale)
        return (h + residual) * SQRT_HALF, window[:, window.size(1) - self.context :]

    def _attend(
        self, h: torch.Tensor, g: torch.Tensor, memory: Memory, scale: torch.Tensor
    ) -> torch.Tensor:
        d = (self.attn_in(h) + g) * SQRT_HALF  # (N, T, E)
        scores = torch.bmm(d, memory["keys"].transpose(1, 2)).float()  # (N, T, S)
        # finfo.min rather than -inf: exp underflows to exactly 0 for pads, and a source with
        # no real token gives uniform weights over zero values instead of NaN.
        scores = scores.masked_fill(~memory["mask"][:, None, :], torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1).to(d.dtype)
        context = torch.bmm(weights, memory["values"]) * scale
        return (self.attn_out(context) + h) * SQRT_HALF


class _ConvDecoder(nn.Module):
    """Matmul layers of the decoder except the output projection's weight (maybe tied)."""

    def __init__(self, arch: ConvSeq2SeqArchitecture, vocab_size: int):
        super().__init__()
        self.fc1 = _linear(arch.emb_dim, arch.hidden, dropout=arch.dropout)
        self.layers = nn.ModuleList(_DecoderLayer(arch) for _ in range(arch.n_dec_layers))
        self.fc2 = _linear(arch.hidden, arch.emb_dim)
        self.out_bias = nn.Parameter(torch.zeros(vocab_size))


class ConvSeq2Seq(nn.Module):
    """ConvS2S encoder-decoder; see the module docstring for the architecture and interface."""

    def __init__(self, arch: ConvSeq2SeqArchitecture, vocab_size: int):
        super().__init__()
        if vocab_size <= max(PAD_ID, BOS_ID, EOS_ID):
            raise ValueError(f"vocab_size {vocab_size} leaves no room for the special tokens")
        self.arch = arch
        self.vocab_size = vocab_size
        E, M = arch.emb_dim, arch.max_positions
        self.tgt_emb = _embedding(vocab_size, E, PAD_ID)
        self.src_emb = self.tgt_emb if arch.share_embeddings else _embedding(vocab_size, E, PAD_ID)
        self.src_pos = _embedding(M, E)
        self.tgt_pos = _embedding(M, E)
        self.drop = nn.Dropout(arch.dropout)
        self.encoder = _ConvEncoder(arch)
        self.decoder = _ConvDecoder(arch, vocab_size)
        self.out_weight: nn.Parameter | None = None
        if not arch.share_embeddings:
            # Its input went through dropout: std sqrt((1 - p) / E), like fairseq's fc3.
            std = math.sqrt((1.0 - arch.dropout) / E)
            self.out_weight = nn.Parameter(torch.randn(vocab_size, E) * std)

    @property
    def max_positions(self) -> int:
        """Longest source, and decoding position t needs t < max_positions."""
        return self.arch.max_positions

    def _check_length(self, length: int) -> None:
        if length > self.arch.max_positions:
            raise ValueError(f"length {length} > max_positions {self.arch.max_positions}")

    def _output_weight(self) -> torch.Tensor:
        return self.tgt_emb.weight if self.out_weight is None else self.out_weight

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> Memory:
        """src (B, S) long, src_mask (B, S) bool -> {"keys", "values": (B, S, E), "mask"}."""
        self._check_length(src.size(1))
        # Positions count real tokens, so the first real token is at 0 under any padding.
        positions = (src_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        emb = self.drop(self.src_emb(src) + self.src_pos(positions))
        keys, values = self.encoder(emb, src_mask)
        return {"keys": keys, "values": values, "mask": src_mask}

    def init_state(self, memory: Memory) -> State:
        """Zero conv inputs (the causal left padding) for every decoder layer, position 0."""
        keys = memory["keys"]
        n, k = keys.size(0), self.arch.kernel_size
        zeros = keys.new_zeros(n, k - 1, self.arch.hidden)
        pos = torch.zeros(n, dtype=torch.long, device=keys.device)
        return {"conv": [zeros] * self.arch.n_dec_layers, "pos": pos}

    def _decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, state: State, memory: Memory
    ) -> tuple[torch.Tensor, State]:
        """tokens, positions (N, T) -> logits (N, T, V) and the state after them."""
        g = self.drop(self.tgt_emb(tokens) + self.tgt_pos(positions))
        # Attention output scale m * sqrt(1/m) = sqrt(m), m = real source tokens (paper 3.3).
        scale = memory["mask"].sum(dim=1).to(g.dtype).sqrt()[:, None, None]
        x = self.decoder.fc1(g)
        conv_state = []
        for layer, past in zip(self.decoder.layers, state["conv"], strict=True):
            x, past = layer(x, past, g, memory, scale)
            conv_state.append(past)
        x = self.drop(self.decoder.fc2(x))
        logits = F.linear(x, self._output_weight(), self.decoder.out_bias)
        return logits, {"conv": conv_state, "pos": positions[:, -1] + 1}

    def forward(
        self, src: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced pass: tgt_in (B, T) starting with BOS_ID -> logits (B, T, V)."""
        self._check_length(tgt_in.size(1))
        memory = self.encode(src, src_mask)
        positions = torch.arange(tgt_in.size(1), device=tgt_in.device).expand_as(tgt_in)
        logits, _ = self._decode(tgt_in, positions, self.init_state(memory), memory)
        return logits

    def decode_step(
        self, tokens: torch.Tensor, state: State, memory: Memory
    ) -> tuple[torch.Tensor, State]:
        """tokens (N,) at position state["pos"] -> logits (N, V) for the next position."""
        positions = state["pos"][:, None]
        if positions.numel():
            self._check_length(int(positions.max()) + 1)
        logits, state = self._decode(tokens[:, None], positions, state, memory)
        return logits[:, 0], state

    def reorder_state(self, state: State, index: torch.Tensor) -> State:
        """Select (and repeat) rows: index_select(0, index) on every state tensor."""
        return {
            "conv": [c.index_select(0, index) for c in state["conv"]],
            "pos": state["pos"].index_select(0, index),
        }

    def flops_per_token(self, src_len: float, tgt_len: float) -> float:
        """Approximate training FLOPs per target token (forward + backward):

            6 * (N_dec + N_enc * src_len / tgt_len) + n_dec_layers * 2 * 2 * 3 * emb_dim * src_len

        N_enc, N_dec count the parameters used in matmuls (weights and biases of the linear
        layers and convolutions, the output projection included, tied or not); embedding
        lookups are free. 6 = 2 FLOPs per multiply-add forward + 4 backward; encoder work
        is done once per source token, hence the src_len / tgt_len ratio. The attention term
        is the score and weighted-sum products (2 matmuls x 2 FLOPs x emb_dim x src_len,
        times 3 for forward + backward) in every decoder layer. src_len and tgt_len are mean
        real (non-pad) lengths.
        """
        n_enc = sum(p.numel() for p in self.encoder.parameters())
        n_dec = sum(p.numel() for p in self.decoder.parameters())
        n_dec += self._output_weight().numel()
        ratio = src_len / max(tgt_len, 1e-9)
        attention = self.arch.n_dec_layers * 2 * 2 * 3 * self.arch.emb_dim * src_len
        return 6.0 * (n_dec + n_enc * ratio) + attention


class ConvSeq2SeqFamily(Seq2SeqFamily):
    """Convolutional encoder-decoder with multi-step attention (Gehring et al. 2017)."""

    Architecture = ConvSeq2SeqArchitecture

    def build(self, arch: ConvSeq2SeqArchitecture, vocab_size: int) -> nn.Module:
        return ConvSeq2Seq(arch, vocab_size)

    def max_positions(self, arch: ConvSeq2SeqArchitecture) -> int | None:
        return arch.max_positions
