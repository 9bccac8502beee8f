"""Load a trained model directory (model_config.json + model.pt) and use it on text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F

from seqmodels import EOS_ID, PAD_ID
from seqmodels.decoding import beam_search, greedy_decode, sample_continuation
from seqmodels.lm_models import TransformerLanguageModel
from seqmodels.training import ARCHS, resolve_device

RNN_WINDOW = 256  # RNN scoring chunk; the state is carried, so any size gives the same NLL


def load_model(model_dir: Path, device: str = "auto") -> torch.nn.Module:
    """Rebuild the model from model_config.json and load model.pt (weights_only)."""
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "model_config.json").read_text())
    cfg_cls, model_cls = ARCHS[meta["arch"]]
    model = model_cls(cfg_cls(**meta["config"]))
    state = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(resolve_device(device)).eval()


class Translator:
    def __init__(
        self,
        model_dir: Path,
        spm_model_path: Path,
        device: str = "auto",
        beam_size: int = 5,
        max_len_a: float = 1.2,
        max_len_b: float = 10,
        length_penalty: float = 1.0,
        batch_size: int = 64,
    ):
        self.model = load_model(model_dir, device)
        self.device = next(self.model.parameters()).device
        self.sp = spm.SentencePieceProcessor(model_file=str(spm_model_path))
        self.beam_size = beam_size
        self.max_len_a = max_len_a
        self.max_len_b = max_len_b
        self.length_penalty = length_penalty
        self.batch_size = batch_size

    def translate_ids(self, sources: list[list[int]]) -> list[list[int]]:
        """Source piece ids (no eos) -> output piece ids, in input order."""
        limit = getattr(self.model, "max_positions", None)
        srcs = [(s[: limit - 1] if limit else list(s)) + [EOS_ID] for s in sources]
        order = sorted(range(len(srcs)), key=lambda i: len(srcs[i]))  # less padding
        out: list[list[int]] = [[] for _ in srcs]
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            S = max(len(srcs[i]) for i in idx)
            src = np.full((len(idx), S), PAD_ID, dtype=np.int64)
            for r, i in enumerate(idx):
                src[r, : len(srcs[i])] = srcs[i]
            src_t = torch.from_numpy(src).to(self.device)
            mask = src_t != PAD_ID
            with torch.autocast(
                self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"
            ):
                if self.beam_size <= 1:
                    hyps = greedy_decode(self.model, src_t, mask, self.max_len_a, self.max_len_b)
                else:
                    hyps = beam_search(
                        self.model,
                        src_t,
                        mask,
                        beam_size=self.beam_size,
                        max_len_a=self.max_len_a,
                        max_len_b=self.max_len_b,
                        length_penalty=self.length_penalty,
                    )
            for i, h in zip(idx, hyps, strict=True):
                out[i] = h
        return out

    def translate(self, sentences: list[str]) -> list[str]:
        ids = self.translate_ids(self.sp.encode(list(sentences)))
        return [self.sp.decode(h) for h in ids]


class NeuralLanguageModel:
    def __init__(self, model_dir: Path, spm_model_path: Path, device: str = "auto"):
        self.model = load_model(model_dir, device)
        self.device = next(self.model.parameters()).device
        self.sp = spm.SentencePieceProcessor(model_file=str(spm_model_path))

    def stream_ids(self, lines: list[str]) -> list[int]:
        """[EOS] + (pieces(line) + [EOS] for each line): the stream the LM was trained on."""
        ids = [EOS_ID]
        for pieces in self.sp.encode(list(lines)):
            ids.extend(pieces)
            ids.append(EOS_ID)
        return ids

    def total_nll(self, lines: list[str]) -> tuple[float, int]:
        """Natural-log NLL summed over every predicted token of the stream, and their count."""
        nll = self.token_nll(lines)
        return float(nll.sum()), len(nll)

    def line_nll(self, lines: list[str]) -> np.ndarray:
        """NLL (nats) of each line: its pieces plus the end-of-line event, scored in context."""
        lengths = [len(pieces) + 1 for pieces in self.sp.encode(list(lines))]
        return np.add.reduceat(self.token_nll(lines), np.cumsum([0, *lengths[:-1]]))

    @torch.no_grad()
    def token_nll(self, lines: list[str]) -> np.ndarray:
        """NLL (nats) of every predicted token of the stream (all ids after the first)."""
        ids = self.stream_ids(lines)
        if isinstance(self.model, TransformerLanguageModel):
            return self._nll_transformer(ids)
        return self._nll_rnn(ids)

    def _nll_rnn(self, ids: list[int]) -> np.ndarray:
        x = torch.tensor(ids, device=self.device)
        state, parts = None, []
        for s in range(0, len(ids) - 1, RNN_WINDOW):
            inp = x[s : s + RNN_WINDOW][None]
            tgt = x[s + 1 : s + RNN_WINDOW + 1][None]
            inp = inp[:, : tgt.size(1)]
            logits, state = self.model(inp, state)
            parts.append(F.cross_entropy(logits[0].float(), tgt[0], reduction="none").cpu())
        return torch.cat(parts).double().numpy()

    def _nll_transformer(self, ids: list[int], batch_size: int = 32) -> np.ndarray:
        """Sliding windows of block_size with stride block_size // 2: each window scores
        only targets not scored before, so every token after the first window is
        predicted from at least block_size // 2 tokens of context."""
        W = self.model.config.block_size
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
        # Each target is kept in exactly one window, in stream order.
        parts = []
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
        max_new_tokens: int = 100,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_line_end: bool = True,
    ) -> list[str]:
        """Continue each prompt for up to max_new_tokens; returns only the continuation text.
        With stop_at_line_end the continuation ends at the first EOS, otherwise it runs on
        across lines, each EOS becoming a newline."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
        outputs = []
        for prompt in prompts:
            prompt_ids = [EOS_ID] + self.sp.encode(prompt)
            stop = EOS_ID if stop_at_line_end else None
            new = sample_continuation(
                self.model, prompt_ids, max_new_tokens, temperature, top_k, top_p, gen, stop
            )
            outputs.append(continuation_text(self.sp, prompt_ids[1:], new))
        return outputs


def continuation_text(sp: spm.SentencePieceProcessor, prompt: list[int], new: list[int]) -> str:
    """Text of `new` as it continues `prompt`; every EOS in `new` starts a new line."""
    lines: list[list[int]] = [[]]
    for token in new:
        if token == EOS_ID:
            lines.append([])
        else:
            lines[-1].append(token)
    # Decode the first line together with the prompt so the boundary space is kept
    # ("the" + "▁cat" -> " cat").
    prefix, full = sp.decode(prompt), sp.decode(prompt + lines[0])
    first = full[len(prefix) :] if full.startswith(prefix) else sp.decode(lines[0])
    return "\n".join([first] + [sp.decode(line) for line in lines[1:]])
