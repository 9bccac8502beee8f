"""Pretrained Hugging Face causal LMs (GPT-2 and other `AutoModelForCausalLM` checkpoints),
fine-tuned by the seqmodels trainer and scored with the checkpoint's own tokenizer.

The model folder holds, beside model.pt, the checkpoint's config and tokenizer files in
`hf/` (save_pretrained layout), so it loads without the original checkpoint. The LM stream
is the one every seqmodels LM trains on, with the tokenizer's eos token as the end of line,
so bits per character compare with the SentencePiece models and the n-gram model.

`transformers` is an optional extra: nothing here imports it at module import time.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import model_validator

from seqmodels.files import file_sha256
from seqmodels.inference.predictors import NeuralLMPredictor
from seqmodels.models.family import NeuralLMFamily, TrainJob, identity, load_weights
from seqmodels.settings import Settings
from seqmodels.training.flops import matmul_params
from seqmodels.training.settings import LMTrainSettings

HF_DIR = "hf"  # the model folder's copy of the checkpoint's config and tokenizer
INSTALL_HINT = "install the hf extra: pip install 'seqmodels[hf]'"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def require_transformers() -> Any:
    """The `transformers` module, or an ImportError saying which extra to install."""
    try:
        import transformers
    except ImportError:
        raise ImportError(
            f"pretrained Hugging Face models need transformers: {INSTALL_HINT}"
        ) from None
    return transformers


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (any of 1/true/yes/on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def not_available(pretrained: str, why: str) -> ValueError:
    return ValueError(
        f"pretrained checkpoint {pretrained!r} is not a local folder and {why}. Download it on a "
        "machine with internet (`hf download <id> --local-dir FOLDER`, or `save_pretrained("
        "FOLDER)` of the model and its tokenizer) and set `pretrained:` to that folder"
    )


def check_checkpoint(pretrained: str, revision: str | None) -> None:
    """A ValueError when `pretrained` cannot be found without the network while the hub is
    offline; a local folder must hold config.json. Never touches the network."""
    local = Path(pretrained).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ValueError(f"pretrained folder {local} has no config.json (save_pretrained)")
        return
    if not hub_offline():
        return  # resolved (and downloaded) through the Hugging Face cache when training
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(pretrained, "config.json", revision=revision)
    except ValueError:  # not even a valid hub id (huggingface_hub's HFValidationError)
        cached = None
    if not isinstance(cached, str):
        raise not_available(pretrained, "is not in the Hugging Face cache (HF_HUB_OFFLINE is set)")


class HFCausalLMArchitecture(Settings):
    # A folder in save_pretrained layout, or a hub id resolved through the Hugging Face cache.
    pretrained: str
    revision: str | None = None  # hub branch, tag or commit; ignored for a folder

    @model_validator(mode="after")
    def _transformers_installed(self) -> HFCausalLMArchitecture:
        # Checked here (not only when training) so a config fails before any stage runs.
        try:
            require_transformers()
        except ImportError as exc:
            raise ValueError(str(exc)) from None
        return self


class HFTokenizer:
    """A Hugging Face tokenizer with the part of SentencePiece's interface seqmodels uses."""

    def __init__(self, tokenizer: Any):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token to end lines")
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, source: str | Path, revision: str | None = None) -> HFTokenizer:
        auto = require_transformers().AutoTokenizer
        return cls(auto.from_pretrained(str(source), revision=revision))

    def encode(self, text: str | list[str]) -> list[int] | list[list[int]]:
        """Ids of one text, or of each text of a list (no special tokens added)."""
        if isinstance(text, str):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in text]

    def decode(self, ids: list[int]) -> str:
        # No clean-up of spaces: the text should come back as it was encoded.
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def vocab_size(self) -> int:
        return len(self.tokenizer)  # added tokens included

    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def banned_ids(self) -> tuple[int, ...]:
        """Special tokens other than eos (pad, bos, unk, mask...): never sampled as text."""
        return tuple(sorted(set(self.tokenizer.all_special_ids) - {self.eos_id()}))

    def save(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(str(folder))


def context_length(config: Any) -> int | None:
    """Positions the model has (GPT-2 names them n_positions, most others
    max_position_embeddings); None when the config sets neither."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def pretrained_config(arch: HFCausalLMArchitecture) -> Any:
    check_checkpoint(arch.pretrained, arch.revision)
    auto = require_transformers().AutoConfig
    try:
        return auto.from_pretrained(arch.pretrained, revision=arch.revision)
    except OSError as exc:  # not found locally and the hub cannot be reached
        raise not_available(arch.pretrained, f"could not be loaded ({exc})") from None


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


def load_pretrained(arch: HFCausalLMArchitecture) -> nn.Module:
    """The checkpoint's model with its weights, in float32 (the trainer autocasts)."""
    check_checkpoint(arch.pretrained, arch.revision)
    auto = require_transformers().AutoModelForCausalLM
    try:
        model = auto.from_pretrained(arch.pretrained, revision=arch.revision)
    except OSError as exc:  # not found locally and the hub cannot be reached
        raise not_available(arch.pretrained, f"could not be loaded ({exc})") from None
    return model.float()


def checkpoint_digest(pretrained: str) -> dict[str, str]:
    """sha256 of a local checkpoint's weight files (a hub id is known by id and revision)."""
    folder = Path(pretrained).expanduser()
    if not folder.is_dir():
        return {}
    files = sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    return {p.name: file_sha256(p) for p in files}


class HFCausalLMFamily(NeuralLMFamily):
    """Fine-tunes a pretrained Hugging Face causal LM with its own tokenizer."""

    Architecture = HFCausalLMArchitecture

    def preflight(self, arch: HFCausalLMArchitecture) -> None:
        check_checkpoint(arch.pretrained, arch.revision)

    def build(self, arch: HFCausalLMArchitecture, vocab_size: int) -> nn.Module:
        model = HFCausalLM(load_pretrained(arch))
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
        hf_dir = job.out_dir / HF_DIR
        pretrained_config(arch).save_pretrained(str(hf_dir))
        HFTokenizer.load(arch.pretrained, arch.revision).save(hf_dir)
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

    def load(self, model_dir: Path, arch: Any, decoding: dict, device: str = "auto"):
        hf_dir = Path(model_dir) / HF_DIR
        transformers = require_transformers()
        config = transformers.AutoConfig.from_pretrained(str(hf_dir))
        hf_model = transformers.AutoModelForCausalLM.from_config(config).float()
        model = load_weights(HFCausalLM(hf_model), model_dir, device)
        tok = HFTokenizer.load(hf_dir)
        return NeuralLMPredictor(model, tok, tok.eos_id(), tok.banned_ids())
