"""Pretrained Hugging Face causal LMs (GPT-2 and other `AutoModelForCausalLM` checkpoints),
fine-tuned by the seqmodels trainer and scored with the checkpoint's own tokenizer.

The model folder holds, beside model.pt, the checkpoint's config and tokenizer files in
`hf/` (save_pretrained layout), so it loads without the original checkpoint. The LM stream
is the one every seqmodels LM trains on, with the tokenizer's eos token as the end of line,
so bits per character compare with the SentencePiece models and the n-gram model.

`transformers` is an optional extra: nothing here imports it at module import time
(seqmodels.models.huggingface).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from seqmodels.inference.predictors import NeuralLMPredictor
from seqmodels.models.family import NeuralLMFamily, TrainJob, identity, load_weights
from seqmodels.models.huggingface import (
    HF_DIR,
    HFTokenizer,
    PretrainedArchitecture,
    check_checkpoint,
    checkpoint_digest,
    checkpoint_lineage,
    context_length,
    load_pretrained,
    model_from_folder,
    pretrained_config,
    save_checkpoint_files,
)
from seqmodels.training.flops import matmul_params
from seqmodels.training.settings import LMTrainSettings

AUTO_CLASS = "AutoModelForCausalLM"


class HFCausalLMArchitecture(PretrainedArchitecture):
    """`pretrained:` an AutoModelForCausalLM checkpoint (folder or hub id)."""


class HFCausalLM(nn.Module):
    """An AutoModelForCausalLM behind the seqmodels LM interface; the state is its KV cache."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        # transformers 5 renamed past_key_values to cache; older versions only know the first.
        params = inspect.signature(hf_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def max_context(self) -> int | None:
        return context_length(self.hf.config)

    def forward(self, idx: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """idx (B, T) -> logits (B, T, V) and the cache including idx (None in training,
        where no cache is kept); with `state`, idx are the tokens after it."""
        use_cache = state is not None or not self.training
        extra = {self._cache_arg: state} if state is not None else {}
        out = self.hf(input_ids=idx, use_cache=use_cache, **extra)
        if not use_cache:
            return out.logits, None
        return out.logits, out[self._cache_arg]  # outputs name the cache as forward does

    def state_length(self, state: Any) -> int:
        if hasattr(state, "get_seq_length"):
            return int(state.get_seq_length())
        return state[0][0].size(2)  # legacy tuple of (key, value) per layer

    def flops_per_token(self, context: float) -> float:
        """6N plus attention over `context` tokens (see seqmodels.training.flops)."""
        enc, other = matmul_params(self)
        config = self.hf.config
        return 6.0 * (enc + other) + 12.0 * config.num_hidden_layers * config.hidden_size * context


class HFCausalLMFamily(NeuralLMFamily):
    """Fine-tunes a pretrained Hugging Face causal LM with its own tokenizer."""

    Architecture = HFCausalLMArchitecture

    def preflight(self, arch: HFCausalLMArchitecture) -> None:
        check_checkpoint(arch.pretrained, arch.revision)

    def build(self, arch: HFCausalLMArchitecture, vocab_size: int) -> nn.Module:
        model = HFCausalLM(load_pretrained(arch, AUTO_CLASS))
        if vocab_size > model.hf.config.vocab_size:
            raise ValueError(
                f"{arch.pretrained}: the tokenizer has {vocab_size} tokens, the model "
                f"only {model.hf.config.vocab_size}"
            )
        return model

    def train(
        self, arch: HFCausalLMArchitecture, training: LMTrainSettings, job: TrainJob
    ) -> dict[str, Any]:
        # Config and tokenizer go into the folder first: training reads the tokenizer from
        # there, so the folder loads with exactly the tokenizer it was trained with.
        tok = HFTokenizer.load(arch.pretrained, arch.revision)
        save_checkpoint_files(arch, job.out_dir / HF_DIR, tok)
        return super().train(arch, training, job)

    def tokenizer(self, arch: HFCausalLMArchitecture, job: TrainJob) -> HFTokenizer:
        return HFTokenizer.load(job.out_dir / HF_DIR)

    def end_of_line_id(self, tokenizer: HFTokenizer) -> int:
        return tokenizer.eos_id()

    def max_context(self, arch: HFCausalLMArchitecture) -> int | None:
        return context_length(pretrained_config(arch))

    def model_identity(
        self, arch: HFCausalLMArchitecture, job: TrainJob, vocab_size: int
    ) -> dict[str, Any]:
        # Other weights in the same folder make another run (resume must not mix them).
        found = identity(job.model_type, arch, vocab_size, job.init_weights)
        return {**found, "checkpoint_sha256": checkpoint_digest(arch.pretrained)}

    def lineage(self, arch: HFCausalLMArchitecture) -> dict[str, str]:
        return checkpoint_lineage(arch)

    def load(self, model_dir: Path, arch: Any, decoding: dict, device: str = "auto"):
        hf_dir = Path(model_dir) / HF_DIR
        model = load_weights(HFCausalLM(model_from_folder(hf_dir, AUTO_CLASS)), model_dir, device)
        tok = HFTokenizer.load(hf_dir)
        return NeuralLMPredictor(model, tok, tok.eos_id(), tok.banned_ids())
