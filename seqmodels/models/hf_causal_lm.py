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
from seqmodels.training.flops import matmul_params


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


class HFCausalLMFamily(PretrainedFamily, NeuralLMFamily):
    """Fine-tunes a pretrained Hugging Face causal LM with its own tokenizer."""

    Architecture = HFCausalLMArchitecture
    transformers_task = "text-generation"
    auto_class = "AutoModelForCausalLM"
    wrapper = HFCausalLM

    def end_of_line_id(self, tokenizer: HFTokenizer) -> int:
        return tokenizer.eos_id()

    def max_context(self, arch: HFCausalLMArchitecture) -> int | None:
        return context_length(pretrained_config(arch))

    def load(self, model_dir: Path, arch: Any, decoding: dict, device: str = "auto"):
        model = self.folder_model(model_dir, arch, device)
        return self.predictor(model, HFTokenizer.load(Path(model_dir) / HF_DIR))

    def load_exported(self, folder: Path, arch: Any, decoding: dict, device: str = "auto"):
        return self.predictor(self.exported_model(folder, device), HFTokenizer.load(folder))

    def predictor(self, model: HFCausalLM, tok: HFTokenizer) -> NeuralLMPredictor:
        return NeuralLMPredictor(model, tok, tok.eos_id(), tok.banned_ids())

    def transformers_pipeline(
        self, model_dir: Path, arch: Any, decoding: dict, hf_task: str
    ) -> Any:
        """The text-generation pipeline, sampling as `seqmodels generate` does by default
        (temperature 0.8, 60 new tokens, or half the context when that is shorter)."""
        predictor = self.load(model_dir, arch, decoding, device="cpu")
        hf_model = without_lora(predictor.model.hf, arch.lora)
        context = predictor.model.max_context
        settings = {
            "do_sample": True,
            "temperature": 0.8,
            "max_new_tokens": min(60, context // 2) if context else 60,
            "pad_token_id": predictor.eos_id,  # GPT-2 has no pad token: batches pad with eos
        }
        for key, value in settings.items():
            setattr(hf_model.generation_config, key, value)
        return hf_pipeline(hf_task, hf_model, predictor.sp)
