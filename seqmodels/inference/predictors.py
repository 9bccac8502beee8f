"""Trained models used on text: one interface for evaluation, the pyfunc and the CLI.

- sequence-to-sequence models: `TranslationPredictor.translate(texts)` (beam search or greedy),
  `summarize(texts)` the same decoding under a summariser's name;
- language models: `total_nll(lines)`, `line_nll(lines)`, `perplexities(lines)`,
  `generate(prompts, ...)`.

A family's `load` builds one of these around its model (seqmodels.models); predictors only use
the model interfaces described in seqmodels/models/family.py, never the model classes.
"""

from __future__ import annotations

import math

import numpy as np
import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqmodels import BOS_ID, EOS_ID, PAD_ID
from seqmodels.inference.decoding import beam_search, greedy_decode, sample_continuation
from seqmodels.training.batching import truncate_sources

RNN_WINDOW = 256  # recurrent scoring chunk; the state is carried, so any size gives the same NLL
# The `decoding` settings a seq2seq predictor reads (the experiment's `evaluation` ones, kept
# in the model folder): beam_size (1: greedy), output length max_len_a * source + max_len_b
# and at least min_len (the max wins), GNMT length_penalty alpha, no_repeat_ngram_size (0:
# off), max_source_tokens (None: no cut; the limit training cut sources at), batch_size.
DECODING_KEYS = (
    "beam_size",
    "max_len_a",
    "max_len_b",
    "min_len",
    "length_penalty",
    "no_repeat_ngram_size",
    "max_source_tokens",
    "batch_size",
)


def source_room(max_source_tokens: int | None, position_room: int | None) -> int | None:
    """Source tokens decoding keeps: the smaller of max_source_tokens (the cut training made)
    and what the model's positions hold beside the special tokens (None: no limit)."""
    limits = [n for n in (max_source_tokens, position_room) if n is not None]
    return min(limits) if limits else None


class TranslationPredictor:
    """Decodes a seq2seq model trained from scratch (seqmodels.inference.decoding) with the
    `decoding` settings (DECODING_KEYS). `truncated_sources`: how many inputs of the last
    call were cut (at max_source_tokens, or at the model's positions)."""

    default_task = "translate"

    def __init__(self, model: nn.Module, sp: spm.SentencePieceProcessor, decoding: dict):
        self.model, self.sp = model, sp
        self.device = next(model.parameters()).device
        self.max_positions = model.max_positions
        self.configure(decoding)

    def configure(self, decoding: dict) -> None:
        """Read the `decoding` settings (DECODING_KEYS; the defaults where one is missing)."""
        settings = {k: decoding[k] for k in DECODING_KEYS if decoding.get(k) is not None}
        self.beam_size = int(settings.get("beam_size", 5))
        self.max_len_a = float(settings.get("max_len_a", 1.2))
        self.max_len_b = float(settings.get("max_len_b", 10))
        self.min_len = int(settings.get("min_len", 0))
        self.length_penalty = float(settings.get("length_penalty", 1.0))
        self.no_repeat_ngram_size = int(settings.get("no_repeat_ngram_size", 0))
        cap = settings.get("max_source_tokens")
        self.max_source_tokens = None if cap is None else int(cap)
        self.batch_size = int(settings.get("batch_size", 64))
        self.truncated_sources = 0

    def translate(self, sentences: list[str]) -> list[str]:
        ids = self.translate_ids(self.sp.encode(list(sentences)))
        return [self.sp.decode(h) for h in ids]

    def summarize(self, texts: list[str]) -> list[str]:
        """Summaries: the same decoding as `translate` (the settings make it a summariser)."""
        return self.translate(texts)

    def translate_ids(self, sources: list[list[int]]) -> list[list[int]]:
        """Source piece ids (no eos) -> output piece ids, in input order. Sources are cut to
        max_source_tokens pieces (and to the model's positions, beside the EOS appended)."""
        limit = self.max_positions
        room = source_room(self.max_source_tokens, limit - 1 if limit else None)
        # The cut of training (truncate_sources), so the model decodes what it learnt from.
        cut, self.truncated_sources = truncate_sources(sources, room)
        srcs = [list(s) + [EOS_ID] for s in cut]
        order = sorted(range(len(srcs)), key=lambda i: len(srcs[i]))  # less padding
        out: list[list[int]] = [[] for _ in srcs]
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            for i, hyp in zip(idx, self.decode_batch([srcs[i] for i in idx]), strict=True):
                out[i] = hyp
        return out

    def decode_batch(self, srcs: list[list[int]]) -> list[list[int]]:
        """Source ids (EOS appended) -> output ids (no BOS/EOS/PAD), in order."""
        src = np.full((len(srcs), max(len(s) for s in srcs)), PAD_ID, dtype=np.int64)
        for r, s in enumerate(srcs):
            src[r, : len(s)] = s
        src_t = torch.from_numpy(src).to(self.device)
        mask = src_t != PAD_ID
        constraints = {
            "max_len_a": self.max_len_a,
            "max_len_b": self.max_len_b,
            "min_len": self.min_len,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        cuda = self.device.type == "cuda"
        with torch.autocast(self.device.type, torch.bfloat16, enabled=cuda):
            if self.beam_size <= 1:
                return greedy_decode(self.model, src_t, mask, **constraints)
            return beam_search(
                self.model,
                src_t,
                mask,
                beam_size=self.beam_size,
                length_penalty=self.length_penalty,
                **constraints,
            )


class LanguageModelPredictor:
    """What every language model offers; subclasses give total_nll, line_nll, generate."""

    default_task = "generate"
    sp: spm.SentencePieceProcessor
    metric_prefix = ""  # "pll_" for pseudo-log-likelihoods (masked LMs)
    can_generate = True

    def total_nll(self, lines: list[str]) -> tuple[float, int]:
        raise NotImplementedError

    def line_nll(self, lines: list[str]) -> np.ndarray:
        """NLL (nats) of each line of the text, end-of-line event included."""
        raise NotImplementedError

    def generate(self, prompts: list[str], **settings) -> list[str]:
        raise NotImplementedError

    def n_predicted(self, lines: list[str]) -> int:
        """Tokens a model predicts on `lines`: every piece plus one end-of-line per line."""
        return sum(len(ids) + 1 for ids in self.sp.encode(list(lines)))

    def perplexities(self, lines: list[str]) -> list[float]:
        """Perplexity per token of each line on its own (from a line start)."""
        out = []
        for line in lines:
            nll, n = self.total_nll([line])
            out.append(math.exp(nll / n))
        return out


class NeuralLMPredictor(LanguageModelPredictor):
    """A neural LM with its tokenizer: SentencePiece, or a family's own tokenizer with the same
    `encode`/`decode`, whose end-of-line id (`eos_id`) and ids that are never sampled
    (`banned`) are given here; the defaults are SentencePiece's conventions."""

    def __init__(
        self,
        model: nn.Module,
        sp: spm.SentencePieceProcessor,
        eos_id: int = EOS_ID,
        banned: tuple[int, ...] = (PAD_ID, BOS_ID),
    ):
        self.model, self.sp = model, sp
        self.eos_id, self.banned = eos_id, tuple(banned)
        self.device = next(model.parameters()).device

    def stream_ids(self, lines: list[str]) -> list[int]:
        """[EOS] + (pieces(line) + [EOS] for each line): the stream the LM was trained on."""
        ids = [self.eos_id]
        for pieces in self.sp.encode(list(lines)):
            ids.extend(pieces)
            ids.append(self.eos_id)
        return ids

    def total_nll(self, lines: list[str]) -> tuple[float, int]:
        """Natural-log NLL summed over every predicted token of the stream, and their count."""
        nll = self.token_nll(lines)
        return float(nll.sum()), len(nll)

    def line_nll(self, lines: list[str]) -> np.ndarray:
        lengths = [len(pieces) + 1 for pieces in self.sp.encode(list(lines))]
        return np.add.reduceat(self.token_nll(lines), np.cumsum([0, *lengths[:-1]]))

    @torch.no_grad()
    def token_nll(self, lines: list[str]) -> np.ndarray:
        """NLL (nats) of every predicted token of the stream (all ids after the first)."""
        ids = self.stream_ids(lines)
        if self.model.max_context is None:
            return self._nll_carried_state(ids)
        return self._nll_sliding_windows(ids, self.model.max_context)

    def _nll_carried_state(self, ids: list[int]) -> np.ndarray:
        x = torch.tensor(ids, device=self.device)
        state, parts = None, []
        for s in range(0, len(ids) - 1, RNN_WINDOW):
            inp = x[s : s + RNN_WINDOW][None]
            tgt = x[s + 1 : s + RNN_WINDOW + 1][None]
            inp = inp[:, : tgt.size(1)]
            logits, state = self.model(inp, state)
            parts.append(F.cross_entropy(logits[0].float(), tgt[0], reduction="none").cpu())
        return torch.cat(parts).double().numpy()

    def _nll_sliding_windows(self, ids: list[int], W: int, batch_size: int = 32) -> np.ndarray:
        """Windows of W tokens with stride W // 2: each window scores only targets not scored
        before, so every token after the first window is predicted from at least W // 2
        tokens of context."""
        stride = max(1, W // 2)
        n_targets = len(ids) - 1
        windows = []  # (start, first target to score); target j predicts ids[j + 1]
        scored, start = 0, 0
        while scored < n_targets:
            windows.append((start, scored))
            scored = min(start + W, n_targets)
            start += stride
        x = np.full((len(windows), W), PAD_ID, dtype=np.int64)
        y = np.full((len(windows), W), PAD_ID, dtype=np.int64)
        keep = np.zeros((len(windows), W), dtype=bool)
        arr = np.asarray(ids, dtype=np.int64)
        for r, (s, first) in enumerate(windows):
            n = min(W, n_targets - s)
            x[r, :n] = arr[s : s + n]
            y[r, :n] = arr[s + 1 : s + n + 1]
            keep[r, first - s : n] = True
        parts = []  # each target is kept in exactly one window, in stream order
        for b in range(0, len(windows), batch_size):
            xb = torch.from_numpy(x[b : b + batch_size]).to(self.device)
            yb = torch.from_numpy(y[b : b + batch_size]).to(self.device)
            kb = torch.from_numpy(keep[b : b + batch_size]).to(self.device)
            logits, _ = self.model(xb)
            nll = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="none")
            parts.append(nll[kb.flatten()].cpu())
        return torch.cat(parts).double().numpy()

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int = 60,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_line_end: bool = False,
    ) -> list[str]:
        """Continue each prompt for up to max_new_tokens; returns only the continuation text.
        By default the continuation runs on across lines (each EOS becomes a newline); with
        stop_at_line_end it ends at the first EOS."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
        outputs = []
        for prompt in prompts:
            prompt_ids = [self.eos_id] + self.sp.encode(prompt)
            new = sample_continuation(
                self.model,
                prompt_ids,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=gen,
                stop_token=self.eos_id if stop_at_line_end else None,
                banned=self.banned,
            )
            outputs.append(continuation_text(self.sp, prompt_ids[1:], new, self.eos_id))
        return outputs


def continuation_text(
    sp: spm.SentencePieceProcessor, prompt: list[int], new: list[int], eos_id: int = EOS_ID
) -> str:
    """Text of `new` as it continues `prompt`; every EOS in `new` starts a new line."""
    lines: list[list[int]] = [[]]
    for token in new:
        if token == eos_id:
            lines.append([])
        else:
            lines[-1].append(token)
    # Decode the first line together with the prompt so the boundary space is kept
    # ("the" + "▁cat" -> " cat").
    prefix, full = sp.decode(prompt), sp.decode(prompt + lines[0])
    first = full[len(prefix) :] if full.startswith(prefix) else sp.decode(lines[0])
    return "\n".join([first] + [sp.decode(line) for line in lines[1:]])
