"""Encoder-decoder translation models: LSTM with attention, and a Transformer.

Both share one interface so decoding.py can drive either:

    memory = model.encode(src, src_mask)            # once per source batch
    state = model.init_state(memory)
    logits, state = model.decode_step(tokens, state, memory)   # one target token per row
    state = model.reorder_state(state, index)       # beam search: pick surviving beams
    memory = select_batch(memory, index)            # e.g. repeat each sentence per beam

`memory` and `state` are dicts/lists of tensors whose first dimension is the batch,
so reordering is a plain index_select. `forward(src, src_mask, tgt_in)` is the
teacher-forced training pass and returns logits (B, T, V).
Masks are boolean with True on real (non-pad) tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqmodels import PAD_ID
from seqmodels.lm_models import (
    FeedForward,
    MultiHeadAttention,
    init_transformer_weights,
    run_rnn,
    self_attention,
)


@dataclass
class LSTMSeq2SeqConfig:
    vocab_size: int = 6000  # joint source/target SentencePiece vocabulary
    emb_dim: int = 256
    enc_hidden: int = 256  # per direction
    dec_hidden: int = 512
    n_enc_layers: int = 1
    n_dec_layers: int = 1
    dropout: float = 0.2
    attention: str = "general"  # Luong "general" | "dot" | Bahdanau-style "additive"
    # Luong input feeding: the previous attentional vector is part of the decoder input.
    # Better translations, but training then needs a Python loop over target positions.
    input_feeding: bool = False
    share_embeddings: bool = True  # one embedding table for source and target


@dataclass
class TransformerSeq2SeqConfig:
    vocab_size: int = 6000
    d_model: int = 256
    n_head: int = 4
    n_enc_layers: int = 3
    n_dec_layers: int = 3
    d_ff: int = 1024
    dropout: float = 0.1
    positions: str = "sinusoidal"  # "sinusoidal" | "learned"
    max_positions: int = 256  # longest source/target the model accepts
    share_embeddings: bool = True  # tie source, target and output embeddings (joint vocab)


def select_batch(tree, index: torch.Tensor):
    """index_select(0, index) on every tensor in a nested dict/list/tuple."""
    if isinstance(tree, torch.Tensor):
        return tree.index_select(0, index)
    if isinstance(tree, dict):
        return {k: select_batch(v, index) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(select_batch(v, index) for v in tree)
    return tree


class LSTMAttentionSeq2Seq(nn.Module):
    """Bidirectional LSTM encoder + LSTM decoder with Luong-style global attention.

    At each target position the decoder state h_t attends over encoder states,
    and the attentional vector tanh(W [context; h_t]) predicts the next token.
    """

    def __init__(self, config: LSTMSeq2SeqConfig):
        super().__init__()
        c = config
        if c.attention not in ("general", "dot", "additive"):
            raise ValueError(f"unknown attention {c.attention!r}")
        if c.attention == "dot" and c.dec_hidden != 2 * c.enc_hidden:
            raise ValueError("dot attention needs dec_hidden == 2 * enc_hidden")
        self.config = c
        enc_out = 2 * c.enc_hidden
        self.src_emb = nn.Embedding(c.vocab_size, c.emb_dim, padding_idx=PAD_ID)
        self.tgt_emb = (
            self.src_emb
            if c.share_embeddings
            else nn.Embedding(c.vocab_size, c.emb_dim, padding_idx=PAD_ID)
        )
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.LSTM(
            c.emb_dim,
            c.enc_hidden,
            c.n_enc_layers,
            batch_first=True,
            bidirectional=True,
            dropout=c.dropout if c.n_enc_layers > 1 else 0.0,
        )
        # Decoder initial state from the encoder's final forward/backward states.
        self.bridge_h = nn.Linear(enc_out, c.dec_hidden * c.n_dec_layers)
        self.bridge_c = nn.Linear(enc_out, c.dec_hidden * c.n_dec_layers)
        dec_in = c.emb_dim + (c.dec_hidden if c.input_feeding else 0)
        self.decoder = nn.LSTM(
            dec_in,
            c.dec_hidden,
            c.n_dec_layers,
            batch_first=True,
            dropout=c.dropout if c.n_dec_layers > 1 else 0.0,
        )
        if c.attention == "general":
            self.attn_key = nn.Linear(enc_out, c.dec_hidden, bias=False)
        elif c.attention == "additive":
            self.attn_key = nn.Linear(enc_out, c.dec_hidden)
            self.attn_query = nn.Linear(c.dec_hidden, c.dec_hidden, bias=False)
            self.attn_v = nn.Linear(c.dec_hidden, 1, bias=False)
        self.combine = nn.Linear(enc_out + c.dec_hidden, c.dec_hidden, bias=False)
        self.out = nn.Linear(c.dec_hidden, c.vocab_size)
        for emb in {self.src_emb, self.tgt_emb}:
            nn.init.uniform_(emb.weight, -0.1, 0.1)

    # --- encoder ---------------------------------------------------------------------
    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> dict:
        B, S = src.shape
        c = self.config
        x = self.drop(self.src_emb(src))
        lengths = src_mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths, batch_first=True, enforce_sorted=False
        )
        out, (h, cell) = run_rnn(self.encoder, packed)
        enc, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=S)
        enc = self.drop(enc)
        # Last layer's final forward (index -2) and backward (index -1) states.
        h_last = torch.cat([h[-2], h[-1]], dim=-1)
        c_last = torch.cat([cell[-2], cell[-1]], dim=-1)
        h0 = torch.tanh(self.bridge_h(h_last)).view(B, c.n_dec_layers, c.dec_hidden)
        c0 = self.bridge_c(c_last).view(B, c.n_dec_layers, c.dec_hidden)
        memory = {"enc": enc, "mask": src_mask, "h0": h0, "c0": c0}
        if c.attention == "general":
            memory["keys"] = self.attn_key(enc)
        elif c.attention == "additive":
            memory["keys"] = self.attn_key(enc)
        else:
            memory["keys"] = enc
        return memory

    # --- decoder ---------------------------------------------------------------------
    def _attend(self, h: torch.Tensor, memory: dict) -> torch.Tensor:
        """Decoder states h (B, T, D) -> attentional vectors (B, T, D)."""
        keys = memory["keys"]
        if self.config.attention == "additive":
            q = self.attn_query(h)
            scores = self.attn_v(torch.tanh(q[:, :, None, :] + keys[:, None, :, :])).squeeze(-1)
        else:
            scores = torch.bmm(h, keys.transpose(1, 2))  # (B, T, S)
        scores = scores.masked_fill(~memory["mask"][:, None, :], float("-inf"))
        weights = F.softmax(scores.float(), dim=-1).to(h.dtype)
        context = torch.bmm(weights, memory["enc"].to(h.dtype))
        return torch.tanh(self.combine(torch.cat([context, h], dim=-1)))

    def init_state(self, memory: dict) -> dict:
        h0 = memory["h0"]
        state = {"h": h0, "c": memory["c0"]}
        if self.config.input_feeding:
            state["feed"] = h0.new_zeros(h0.size(0), self.config.dec_hidden)
        return state

    def _run_decoder(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        hc = (state["h"].transpose(0, 1).contiguous(), state["c"].transpose(0, 1).contiguous())
        out, (h, c) = run_rnn(self.decoder, x, hc)
        return out, {"h": h.transpose(0, 1), "c": c.transpose(0, 1)}

    def _decode(self, tgt_in: torch.Tensor, state: dict, memory: dict):
        """Teacher-forced decoding of tgt_in (B, T) from state -> logits (B, T, V)."""
        emb = self.drop(self.tgt_emb(tgt_in))
        if not self.config.input_feeding:
            # The whole target runs through cuDNN/MKL in one call; attention is batched.
            out, state = self._run_decoder(emb, state)
            attn_vec = self._attend(out, memory)
        else:
            feed, vecs = state["feed"], []
            for t in range(tgt_in.size(1)):
                x = torch.cat([emb[:, t], feed.to(emb.dtype)], dim=-1)[:, None]
                out, state = self._run_decoder(x, state)
                feed = self._attend(out, memory)[:, 0]
                vecs.append(feed)
            state["feed"] = feed
            attn_vec = torch.stack(vecs, dim=1)
        return self.out(self.drop(attn_vec)), state

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor):
        memory = self.encode(src, src_mask)
        logits, _ = self._decode(tgt_in, self.init_state(memory), memory)
        return logits

    def decode_step(self, tokens: torch.Tensor, state: dict, memory: dict):
        """tokens (N,) -> logits (N, V) for the next position, and the new state."""
        logits, state = self._decode(tokens[:, None], state, memory)
        return logits[:, 0], state

    def reorder_state(self, state: dict, index: torch.Tensor) -> dict:
        return select_batch(state, index)


def sinusoidal_table(n_positions: int, d_model: int) -> torch.Tensor:
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    div = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)
    return table


class EncoderLayer(nn.Module):
    def __init__(self, c: TransformerSeq2SeqConfig):
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
    def __init__(self, c: TransformerSeq2SeqConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.d_model)
        self.self_attn = MultiHeadAttention(c.d_model, c.n_head, c.dropout)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.cross_attn = MultiHeadAttention(c.d_model, c.n_head, c.dropout)
        self.ln3 = nn.LayerNorm(c.d_model)
        self.ffn = FeedForward(c.d_model, c.d_ff, c.dropout)

    def forward(self, x, past, cross_kv, cross_mask):
        y, kv = self_attention(self.self_attn, self.ln1(x), past)
        x = x + y
        x = x + self.cross_attn(self.ln2(x), cross_kv, attn_mask=cross_mask)
        x = x + self.ffn(self.ln3(x))
        return x, kv


class TransformerSeq2Seq(nn.Module):
    """Pre-norm Transformer encoder-decoder (Vaswani et al. 2017, pre-LN variant)."""

    def __init__(self, config: TransformerSeq2SeqConfig):
        super().__init__()
        c = config
        if c.positions not in ("sinusoidal", "learned"):
            raise ValueError(f"unknown positions {c.positions!r}")
        self.config = c
        self.tgt_emb = nn.Embedding(c.vocab_size, c.d_model, padding_idx=PAD_ID)
        self.src_emb = (
            self.tgt_emb
            if c.share_embeddings
            else nn.Embedding(c.vocab_size, c.d_model, padding_idx=PAD_ID)
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
        if start + T > self.config.max_positions:
            raise ValueError(f"length {start + T} > max_positions {self.config.max_positions}")
        if self.config.positions == "learned":
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
            x, (k, v) = layer(x, past, cross_kv, cross_mask)
            new_k.append(k)
            new_v.append(v)
        logits = F.linear(self.dec_ln(x), self.tgt_emb.weight)
        return logits, {"self_k": new_k, "self_v": new_v}

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor):
        logits, _ = self._decode(tgt_in, None, self.encode(src, src_mask))
        return logits

    def init_state(self, memory: dict) -> dict:
        k = memory["cross_k"][0]
        empty = k.new_zeros(k.size(0), k.size(1), 0, k.size(3))
        n = self.config.n_dec_layers
        return {"self_k": [empty] * n, "self_v": [empty] * n}

    def decode_step(self, tokens: torch.Tensor, state: dict, memory: dict):
        """tokens (N,) -> logits (N, V) for the next position, and the grown KV cache."""
        logits, state = self._decode(tokens[:, None], state, memory)
        return logits[:, 0], state

    def reorder_state(self, state: dict, index: torch.Tensor) -> dict:
        return select_batch(state, index)

    @property
    def max_positions(self) -> int:
        return self.config.max_positions
