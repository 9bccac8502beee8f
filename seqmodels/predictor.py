"""Load any trained model folder (see seqmodels.recipes) and use it on text.

One interface for the pyfunc, the CLI and evaluation:
- translation models: `translate(texts)`;
- language models: `total_nll(lines)`, `perplexities(lines)`, `generate(prompts, ...)`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from seqmodels import EOS_ID
from seqmodels.recipes import META_FILE
from seqmodels.vocab import load_sentencepiece


class TranslationPredictor:
    default_task = "translate"

    def __init__(self, model_dir: Path, decoding: dict, device: str = "auto"):
        from seqmodels.inference import Translator

        keys = ("beam_size", "max_len_a", "max_len_b", "length_penalty", "batch_size")
        self.translator = Translator(
            model_dir,
            model_dir / "spm.model",
            device,
            **{k: decoding[k] for k in keys if k in decoding},
        )

    def translate(self, texts: list[str]) -> list[str]:
        return self.translator.translate(texts)


class LanguageModelPredictor:
    default_task = "generate"

    def total_nll(self, lines: list[str]) -> tuple[float, int]:
        raise NotImplementedError

    def line_nll(self, lines: list[str]) -> np.ndarray:
        """NLL (nats) of each line of the text, end-of-line event included."""
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
    def __init__(self, model_dir: Path, device: str = "auto"):
        from seqmodels.inference import NeuralLanguageModel

        self.lm = NeuralLanguageModel(model_dir, model_dir / "spm.model", device)
        self.sp = self.lm.sp

    def total_nll(self, lines: list[str]) -> tuple[float, int]:
        return self.lm.total_nll(lines)

    def line_nll(self, lines: list[str]) -> np.ndarray:
        return self.lm.line_nll(lines)

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int = 60,
        temperature: float = 0.8,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> list[str]:
        return self.lm.generate(
            prompts, max_new_tokens, temperature, top_k, None, seed, stop_at_line_end=False
        )


class NgramPredictor(LanguageModelPredictor):
    def __init__(self, model_dir: Path):
        from seqmodels.ngram import KneserNeyLM

        self.model = KneserNeyLM.load(model_dir / "ngram.npz")
        self.sp = load_sentencepiece(model_dir / "spm.model")

    def total_nll(self, lines: list[str]) -> tuple[float, int]:
        return self.model.total_nll(
            [np.asarray(ids, dtype=np.int64) for ids in self.sp.encode(lines)]
        )

    def line_nll(self, lines: list[str]) -> np.ndarray:
        sentences = [np.asarray(ids, dtype=np.int64) for ids in self.sp.encode(list(lines))]
        token_lp = self.model.sentence_logprobs(sentences)  # each sentence's tokens + </s>
        starts = np.cumsum([0, *[len(s) + 1 for s in sentences[:-1]]])
        return -np.add.reduceat(token_lp, starts)

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int = 60,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> list[str]:
        # The n-gram model samples from its own distribution; temperature/top-k do not apply.
        # It samples a line at a time, so a continuation runs on across line ends.
        from seqmodels.inference import continuation_text

        rng = np.random.default_rng(seed)
        outputs = []
        for prompt in prompts:
            prompt_ids = self.sp.encode(prompt)
            line, new = list(prompt_ids), []
            while len(new) < max_new_tokens:
                budget = max_new_tokens - len(new)
                sampled = self.model.sample(1, line, budget, rng)[0].tolist()
                new += sampled
                if len(sampled) == budget:
                    break
                new.append(EOS_ID)  # the line ended: the next one starts from <s>
                line = []
            outputs.append(continuation_text(self.sp, prompt_ids, new))
        return outputs


def load_predictor(model_dir: Path, device: str = "auto"):
    model_dir = Path(model_dir)
    meta_path = model_dir / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{model_dir} is not a finished seqmodels model (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta["task"] == "translation":
        return TranslationPredictor(model_dir, meta.get("decoding", {}), device)
    if meta["type"] == "ngram":
        return NgramPredictor(model_dir)
    return NeuralLMPredictor(model_dir, device)
