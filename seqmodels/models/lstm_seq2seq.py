"""LSTM encoder-decoder with Luong-style global attention (bidirectional encoder).

Implements the decoding interface of every seq2seq family (see models/family.py):
encode / init_state / decode_step / reorder_state, and forward(src, src_mask, tgt_in).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from seqmodels import PAD_ID
from seqmodels.inference.decoding import select_batch
from seqmodels.models.family import Seq2SeqFamily
from seqmodels.models.layers import run_rnn
from seqmodels.settings import Settings
from seqmodels.training.flops import matmul_params, seq2seq_flops_per_token

ENCODER_PREFIXES = ("enc_", "encoder")


class LSTMSeq2SeqArchitecture(Settings):
    emb_dim: int = Field(default=256, gt=0)
    enc_hidden: int = Field(default=256, gt=0)  # per direction
    dec_hidden: int = Field(default=512, gt=0)
    n_enc_layers: int = Field(default=1, gt=0)
    n_dec_layers: int = Field(default=1, gt=0)
    dropout: float = Field(default=0.2, ge=0, lt=1)
    attention: Literal["general", "dot", "additive"] = "general"  # Luong / Bahdanau-style
    # Luong input feeding: the previous attentional vector is part of the decoder input.
    # Better translations, but training then needs a Python loop over target positions.
    input_feeding: bool = False
    share_embeddings: bool = True  # one embedding table for source and target

    @model_validator(mode="after")
    def _dot_needs_equal_sizes(self) -> LSTMSeq2SeqArchitecture:
        if self.attention == "dot" and self.dec_hidden != 2 * self.enc_hidden:
            raise ValueError("dot attention needs dec_hidden == 2 * enc_hidden")
        return self


class LSTMAttentionSeq2Seq(nn.Module):
    """Bidirectional LSTM encoder + LSTM decoder with Luong-style global attention.

    At each target position the decoder state h_t attends over encoder states,
    and the attentional vector tanh(W [context; h_t]) predicts the next token.
    """

    def __init__(self, arch: LSTMSeq2SeqArchitecture, vocab_size: int):
        super().__init__()
        c = arch
        self.arch = c
        enc_out = 2 * c.enc_hidden
        self.src_emb = nn.Embedding(vocab_size, c.emb_dim, padding_idx=PAD_ID)
        self.tgt_emb = (
            self.src_emb
            if c.share_embeddings
            else nn.Embedding(vocab_size, c.emb_dim, padding_idx=PAD_ID)
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
        self.out = nn.Linear(c.dec_hidden, vocab_size)
        for emb in {self.src_emb, self.tgt_emb}:
            nn.init.uniform_(emb.weight, -0.1, 0.1)

    # --- encoder ---------------------------------------------------------------------
    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> dict:
        B, S = src.shape
        c = self.arch
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
        if self.arch.attention == "additive":
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
        if self.arch.input_feeding:
            state["feed"] = h0.new_zeros(h0.size(0), self.arch.dec_hidden)
        return state

    def _run_decoder(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        hc = (state["h"].transpose(0, 1).contiguous(), state["c"].transpose(0, 1).contiguous())
        out, (h, c) = run_rnn(self.decoder, x, hc)
        return out, {"h": h.transpose(0, 1), "c": c.transpose(0, 1)}

    def _decode(self, tgt_in: torch.Tensor, state: dict, memory: dict):
        """Teacher-forced decoding of tgt_in (B, T) from state -> logits (B, T, V)."""
        emb = self.drop(self.tgt_emb(tgt_in))
        if not self.arch.input_feeding:
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

    # Recurrent: no limit on source or target length.
    max_positions = None

    def flops_per_token(self, src_len: float, tgt_len: float) -> float:
        """Matmul FLOPs per target token; attention products are ignored (small)."""
        enc, other = matmul_params(self, ENCODER_PREFIXES)
        return seq2seq_flops_per_token(enc, other, src_len, tgt_len)


class LSTMSeq2SeqFamily(Seq2SeqFamily):
    """A bidirectional-LSTM encoder and an attentional LSTM decoder."""

    Architecture = LSTMSeq2SeqArchitecture

    def build(self, arch: LSTMSeq2SeqArchitecture, vocab_size: int) -> nn.Module:
        return LSTMAttentionSeq2Seq(arch, vocab_size)
