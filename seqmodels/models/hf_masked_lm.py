"""Pretrained Hugging Face masked LMs (`AutoModelForMaskedLM`: BERT, RoBERTa, DistilBERT),
fine-tuned by the seqmodels trainer with BERT's dynamic masking and scored by
pseudo-log-likelihood (Salazar et al. 2020, "Masked Language Model Scoring").

Training text is the LM stream every seqmodels LM trains on (lines joined by the tokenizer's
end token: sep for BERT, </s> for RoBERTa), cut into windows; each batch masks a new 15% of
the ordinary tokens (80% [MASK], 10% a random token, 10% unchanged).

A masked LM has no likelihood of a text, so its test metrics are pseudo-log-likelihoods,
named test_pll_* (per character and per word): every line is scored on its own, framed by the
tokenizer's special tokens ([CLS] line [SEP]), with each of its tokens masked in turn and
predicted from both sides. They are not comparable with causal bits per character: an
experiment holds masked LMs only (seqmodels.config), and the comparison report says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from seqmodels.inference.predictors import LanguageModelPredictor
from seqmodels.models.family import NeuralLMFamily
from seqmodels.models.huggingface import (
    HF_DIR,
    HFTokenizer,
    PretrainedArchitecture,
    PretrainedFamily,
    context_length,
    hf_pipeline,
    pretrained_config,
    without_lora,
)
from seqmodels.training.batching import Masking
from seqmodels.training.flops import matmul_params
from seqmodels.training.settings import LMTrainSettings

PLL_BATCH = 64  # masked copies scored per forward pass


class HFMaskedLMArchitecture(PretrainedArchitecture):
    """`pretrained:` an AutoModelForMaskedLM checkpoint (folder or hub id)."""


class MaskedLMTrainSettings(LMTrainSettings):
    # Share of ordinary tokens selected per batch (BERT: 0.15), 80/10/10 as in the paper.
    mask_probability: float = Field(0.15, gt=0, lt=1)


class HFMaskedLM(nn.Module):
    """An AutoModelForMaskedLM behind the LM training interface: logits at every position
    (the loss reads them where a label is set); no state."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    @property
    def max_context(self) -> int | None:
        return context_length(self.hf.config)

    def forward(self, idx: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, None]:
        return self.hf(input_ids=idx).logits, None

    def flops_per_token(self, context: float) -> float:
        """6N plus attention over `context` tokens, per input token."""
        enc, other = matmul_params(self)
        config = self.hf.config
        layers = getattr(config, "num_hidden_layers", None) or config.n_layers  # DistilBERT
        width = getattr(config, "hidden_size", None) or config.dim
        return 6.0 * (enc + other) + 12.0 * layers * width * context


class MaskedLMPredictor(LanguageModelPredictor):
    """Pseudo-log-likelihood scoring of lines; a masked LM does not generate text."""

    metric_prefix = "pll_"
    can_generate = False

    def __init__(self, model: HFMaskedLM, tok: HFTokenizer):
        self.model, self.sp = model, tok
        self.device = next(model.parameters()).device

    def framed(self, line: str) -> tuple[list[int], list[int]]:
        """The line's ids with the tokenizer's special tokens, and the positions of its own
        tokens (what is scored), cut to the model's positions."""
        hf = self.sp.tokenizer
        limit = self.model.max_context or 512
        ids = hf(line, truncation=True, max_length=limit)["input_ids"]
        special = hf.get_special_tokens_mask(ids, already_has_special_tokens=True)
        return ids, [i for i, s in enumerate(special) if not s]

    @torch.no_grad()
    def line_nll(self, lines: list[str]) -> np.ndarray:
        """Negative pseudo-log-likelihood (nats) of each line: the sum over its tokens of
        -log p(token | the line with that token masked)."""
        copies, owners, targets = [], [], []  # one masked copy per scored token
        for n, line in enumerate(lines):
            ids, positions = self.framed(line)
            for i in positions:
                masked = list(ids)
                masked[i] = self.sp.tokenizer.mask_token_id
                copies.append((masked, i))
                owners.append(n)
                targets.append(ids[i])
        nll = np.zeros(len(lines), dtype=np.float64)
        for b in range(0, len(copies), PLL_BATCH):
            chunk = copies[b : b + PLL_BATCH]
            scored = self.score_copies(chunk, targets[b : b + PLL_BATCH])
            np.add.at(nll, owners[b : b + PLL_BATCH], scored)
        return nll

    def score_copies(self, copies: list[tuple[list[int], int]], targets: list[int]) -> np.ndarray:
        """-log p(target) at each copy's masked position (copies padded to one length)."""
        longest = max(len(ids) for ids, _ in copies)
        pad = self.sp.tokenizer.pad_token_id or 0
        x = torch.full((len(copies), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(copies), longest), dtype=torch.long)
        for r, (ids, _) in enumerate(copies):
            x[r, : len(ids)], mask[r, : len(ids)] = torch.tensor(ids), 1
        logits = self.model.hf(input_ids=x.to(self.device), attention_mask=mask.to(self.device))
        rows = torch.arange(len(copies))
        at = logits.logits[rows, torch.tensor([i for _, i in copies])].float()
        return -F.log_softmax(at, -1)[rows, torch.tensor(targets)].cpu().double().numpy()

    def total_nll(self, lines: list[str]) -> tuple[float, int]:
        return float(self.line_nll(lines).sum()), self.n_predicted(lines)

    def n_predicted(self, lines: list[str]) -> int:
        return sum(len(self.framed(line)[1]) for line in lines)

    def generate(self, prompts: list[str], **settings) -> list[str]:
        raise ValueError("a masked language model does not generate text: use `score`")


class HFMaskedLMFamily(PretrainedFamily, NeuralLMFamily):
    """Fine-tunes a pretrained Hugging Face masked LM with its own tokenizer."""

    Architecture = HFMaskedLMArchitecture
    Training = MaskedLMTrainSettings
    transformers_task = "fill-mask"
    metric_prefix = MaskedLMPredictor.metric_prefix
    auto_class = "AutoModelForMaskedLM"
    wrapper = HFMaskedLM

    def end_of_line_id(self, tokenizer: HFTokenizer) -> int:
        return tokenizer.eos_id()  # sep for BERT

    def max_context(self, arch: HFMaskedLMArchitecture) -> int | None:
        return context_length(pretrained_config(arch))

    def masking(self, training: MaskedLMTrainSettings, tokenizer: HFTokenizer) -> Masking:
        hf = tokenizer.tokenizer
        if hf.mask_token_id is None:
            raise ValueError(f"tokenizer {hf.name_or_path!r} has no mask token")
        return Masking(
            mask_id=hf.mask_token_id,
            vocab_size=tokenizer.vocab_size(),
            special_ids=tuple(hf.all_special_ids),
            probability=training.mask_probability,
            seed=training.seed,
        )

    def load(self, model_dir: Path, arch: Any, decoding: dict, device: str = "auto"):
        model = self.folder_model(model_dir, arch, device)
        return MaskedLMPredictor(model, HFTokenizer.load(Path(model_dir) / HF_DIR))

    def load_exported(self, folder: Path, arch: Any, decoding: dict, device: str = "auto"):
        return MaskedLMPredictor(self.exported_model(folder, device), HFTokenizer.load(folder))

    def transformers_pipeline(
        self, model_dir: Path, arch: Any, decoding: dict, hf_task: str
    ) -> Any:
        predictor = self.load(model_dir, arch, decoding, device="cpu")
        hf_model = without_lora(predictor.model.hf, arch.lora)
        return hf_pipeline(hf_task, hf_model, predictor.sp)
