"""What every pretrained Hugging Face family shares: finding a checkpoint without surprises
(a local folder, or a hub id through the Hugging Face cache; a clear error offline), its
tokenizer behind the part of SentencePiece's interface seqmodels uses, and the digest of its
weights for the lineage.

`transformers` is an optional extra: nothing here imports it at module import time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from seqmodels.files import atomic_path, file_sha256, json_digest
from seqmodels.models.family import identity, load_weights
from seqmodels.settings import Settings
from seqmodels.training.trainer import resolve_device

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


def require_peft() -> Any:
    """The `peft` module, or an ImportError saying which extra to install."""
    try:
        import peft
    except ImportError:
        raise ImportError(f"LoRA fine-tuning needs peft: {INSTALL_HINT}") from None
    return peft


class LoraSettings(Settings):
    """Parameter-efficient fine-tuning (LoRA, Hu et al. 2021, through peft): the checkpoint's
    weights stay frozen and only low-rank adapters on the named layers train."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None  # None: peft's default layers for the model type


class PretrainedArchitecture(Settings):
    # A folder in save_pretrained layout, or a hub id resolved through the Hugging Face cache.
    pretrained: str
    revision: str | None = None  # hub branch, tag or commit; ignored for a folder
    lora: LoraSettings | None = None  # None: every weight is fine-tuned

    @model_validator(mode="after")
    def _packages_installed(self) -> PretrainedArchitecture:
        # Checked here (not only when training) so a config fails before any stage runs.
        try:
            require_transformers()
            if self.lora is not None:
                require_peft()
        except ImportError as exc:
            raise ValueError(str(exc)) from None
        return self


def with_lora(model: nn.Module, lora: LoraSettings | None) -> nn.Module:
    """`model` with LoRA adapters (a peft model whose other weights are frozen), or as it is."""
    if lora is None:
        return model
    peft = require_peft()
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
    )
    return peft.get_peft_model(model, config)


def without_lora(model: nn.Module, lora: LoraSettings | None) -> nn.Module:
    """The plain Hugging Face model with any adapters merged into its weights (what the
    transformers flavor logs: it loads without peft)."""
    return model if lora is None else model.merge_and_unload()


class HFTokenizer:
    """A Hugging Face tokenizer with the part of SentencePiece's interface seqmodels uses."""

    def __init__(self, tokenizer: Any):
        # Lines end with eos; BERT-style tokenizers have none, and end segments with sep.
        end = tokenizer.eos_token_id
        if end is None:
            end = tokenizer.sep_token_id
        if end is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has neither an eos nor a sep token to "
                "end lines with"
            )
        self.tokenizer, self.end_id = tokenizer, int(end)

    @classmethod
    def load(cls, source: str | Path, revision: str | None = None, **options) -> HFTokenizer:
        """The tokenizer of a checkpoint (folder or hub id); `options` go to from_pretrained
        (mBART's src_lang/tgt_lang)."""
        check_checkpoint(str(source), revision)
        auto = require_transformers().AutoTokenizer
        try:
            return cls(auto.from_pretrained(str(source), revision=revision, **options))
        except OSError as exc:  # not found locally and the hub cannot be reached
            raise not_available(str(source), f"could not be loaded ({exc})") from None

    def encode(self, text: str | list[str]) -> list[int] | list[list[int]]:
        """Ids of one text, or of each text of a list (no special tokens added)."""
        if isinstance(text, str):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in text]

    def encode_target(self, texts: list[str]) -> list[list[int]]:
        """Ids of target-side texts (Marian has a target vocabulary of its own; mBART's
        target language), no special tokens added."""
        return [self.tokenizer(text_target=t, add_special_tokens=False)["input_ids"] for t in texts]

    def decode(self, ids: list[int]) -> str:
        # No clean-up of spaces: the text should come back as it was encoded.
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def vocab_size(self) -> int:
        return len(self.tokenizer)  # added tokens included

    def eos_id(self) -> int:
        """The id that ends a line: eos, or sep for a tokenizer without eos."""
        return self.end_id

    def banned_ids(self) -> tuple[int, ...]:
        """Special tokens other than eos (pad, bos, unk, mask...): never sampled as text."""
        return tuple(sorted(set(self.tokenizer.all_special_ids) - {self.eos_id()}))

    def save(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(str(folder))

    def digest(self) -> str:
        """Of the token -> id table: two tokenizers with the same one encode alike."""
        return json_digest(sorted(self.tokenizer.get_vocab().items()))


def context_length(config: Any) -> int | None:
    """Positions the model has (GPT-2 names them n_positions, most others
    max_position_embeddings); None when the config sets neither."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def pretrained_config(arch: PretrainedArchitecture) -> Any:
    check_checkpoint(arch.pretrained, arch.revision)
    auto = require_transformers().AutoConfig
    try:
        return auto.from_pretrained(arch.pretrained, revision=arch.revision)
    except OSError as exc:  # not found locally and the hub cannot be reached
        raise not_available(arch.pretrained, f"could not be loaded ({exc})") from None


def load_pretrained(arch: PretrainedArchitecture, auto_class: str) -> nn.Module:
    """The checkpoint's model with its weights, in float32 (the trainer autocasts)."""
    check_checkpoint(arch.pretrained, arch.revision)
    auto = getattr(require_transformers(), auto_class)
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


def model_from_folder(hf_dir: Path, auto_class: str) -> nn.Module:
    """A model built from a folder's saved config (random weights: model.pt is loaded next)."""
    transformers = require_transformers()
    config = transformers.AutoConfig.from_pretrained(str(hf_dir))
    return getattr(transformers, auto_class).from_config(config).float()


def checkpoint_folder(arch: PretrainedArchitecture) -> Path | None:
    """The local folder of the checkpoint: `pretrained` itself, or the snapshot folder of a hub
    id in the Hugging Face cache (named by its commit); None when it is not there yet."""
    local = Path(arch.pretrained).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(arch.pretrained, "config.json", revision=arch.revision)
    except ValueError:
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def checkpoint_lineage(arch: PretrainedArchitecture) -> dict[str, str]:
    """Lineage tags of the checkpoint a model was fine-tuned from: its id or folder, the hub
    commit (the cache's snapshot folder is named by it) and one digest of its weight files."""
    tags = {"pretrained": arch.pretrained}
    if arch.revision:
        tags["pretrained_revision"] = arch.revision
    folder = checkpoint_folder(arch)
    if folder is None:
        return tags
    if folder.parent.name == "snapshots":
        tags["pretrained_commit"] = folder.name
    digests = checkpoint_digest(str(folder))
    if digests:
        joined = "".join(f"{name}:{digest}\n" for name, digest in sorted(digests.items()))
        tags["pretrained_weights_sha256"] = hashlib.sha256(joined.encode()).hexdigest()
    return tags


def hf_pipeline(task: str, model: nn.Module, tokenizer: HFTokenizer) -> Any:
    """A Hugging Face pipeline over a fine-tuned model (on the CPU: it is for logging)."""
    model = model.to("cpu").eval()
    return require_transformers().pipeline(
        task, model=model, tokenizer=tokenizer.tokenizer, device="cpu"
    )


def pretrained_model(folder: Path, auto_class: str) -> nn.Module:
    """A model with its weights from a save_pretrained folder, in float32."""
    return getattr(require_transformers(), auto_class).from_pretrained(str(folder)).float()


def unpack_pretrained(folder: Path, out_dir: Path, wrapped: nn.Module) -> None:
    """A model folder's hf/ (config and tokenizer files of the save_pretrained `folder`) and
    model.pt (the state of `wrapped`, the family's module around the folder's model)."""
    hf_dir = Path(out_dir) / HF_DIR
    hf_dir.mkdir(parents=True, exist_ok=True)
    for path in Path(folder).iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(path, hf_dir / path.name)
    with atomic_path(Path(out_dir) / "model.pt") as tmp:
        torch.save(wrapped.state_dict(), tmp)


class PretrainedFamily:
    """What every pretrained Hugging Face family shares, mixed in before its ModelFamily base:
    `class HFCausalLMFamily(PretrainedFamily, NeuralLMFamily)`. The family names its Auto
    class and the module that wraps the Hugging Face model in the seqmodels interface."""

    own_tokenizer = True
    # Every rank would write the checkpoint's files into the folder, and a LoRA model's frozen
    # base is not what DistributedDataParallel expects: one process only.
    distributed_training = False
    auto_class: ClassVar[str]  # "AutoModelForCausalLM", ...
    wrapper: ClassVar[Callable[[nn.Module], nn.Module]]

    def load_tokenizer(self, source: str | Path, arch: PretrainedArchitecture) -> HFTokenizer:
        """The tokenizer of the checkpoint (`arch.pretrained`) or of a model folder's copy."""
        revision = arch.revision if str(source) == arch.pretrained else None
        return HFTokenizer.load(source, revision)

    def preflight(self, arch: PretrainedArchitecture) -> None:
        check_checkpoint(arch.pretrained, arch.revision)

    def lineage(self, arch: PretrainedArchitecture) -> dict[str, str]:
        return checkpoint_lineage(arch)

    def build(self, arch: PretrainedArchitecture, vocab_size: int) -> nn.Module:
        return self.build_pretrained(arch, vocab_size)

    def train(self, arch: PretrainedArchitecture, training: Any, job: Any) -> dict[str, Any]:
        self.save_checkpoint_files(arch, job.out_dir)
        return super().train(arch, training, job)  # the family's task recipe (next in MRO)

    def tokenizer(self, arch: PretrainedArchitecture, job: Any) -> HFTokenizer:
        """The tokenizer training reads: the folder's copy of the checkpoint's."""
        return self.load_tokenizer(Path(job.out_dir) / HF_DIR, arch)

    def build_pretrained(self, arch: PretrainedArchitecture, vocab_size: int) -> nn.Module:
        model = self.wrapper(with_lora(load_pretrained(arch, self.auto_class), arch.lora))
        if vocab_size > model.hf.config.vocab_size:
            raise ValueError(
                f"{arch.pretrained}: the tokenizer has {vocab_size} tokens, the model "
                f"only {model.hf.config.vocab_size}"
            )
        return model

    def save_checkpoint_files(self, arch: PretrainedArchitecture, out_dir: Path) -> None:
        """Config and tokenizer into the folder's hf/ before training: training reads the
        tokenizer from there, so the folder loads with exactly the one it was trained with."""
        tok = self.load_tokenizer(arch.pretrained, arch)
        pretrained_config(arch).save_pretrained(str(Path(out_dir) / HF_DIR))
        tok.save(Path(out_dir) / HF_DIR)

    def model_identity(self, arch: PretrainedArchitecture, job: Any, vocab_size: int) -> dict:
        # Other weights in the same folder make another run (resume must not mix them).
        found = identity(job.model_type, arch, vocab_size, job.init_weights)
        return {**found, "checkpoint_sha256": checkpoint_digest(arch.pretrained)}

    def vocabulary(self, arch: PretrainedArchitecture, spm_model: Path | None) -> tuple[str, str]:
        tok = self.load_tokenizer(arch.pretrained, arch)
        return tok.digest(), f"the tokenizer of {arch.pretrained}"

    def folder_vocabulary(self, model_dir: Path) -> tuple[str, str]:
        folder = Path(model_dir) / HF_DIR
        return HFTokenizer.load(folder).digest(), f"the tokenizer in {folder}"

    def folder_model(self, model_dir: Path, arch: PretrainedArchitecture, device: str):
        """The wrapped model of a trained folder (hf/ config, model.pt weights)."""
        hf_model = model_from_folder(Path(model_dir) / HF_DIR, self.auto_class)
        return load_weights(self.wrapper(with_lora(hf_model, arch.lora)), model_dir, device)

    def exported_model(self, folder: Path, device: str) -> nn.Module:
        """The wrapped model of an exported pipeline's save_pretrained folder."""
        built = self.wrapper(pretrained_model(folder, self.auto_class))
        return built.to(resolve_device(device)).eval()

    def unpack_exported(self, folder: Path, arch: PretrainedArchitecture, out_dir: Path) -> None:
        # An exported LoRA model has its adapters merged; fresh adapters (whose B matrices
        # start at zero, so the function is unchanged) give the state a warm start expects.
        hf_model = with_lora(pretrained_model(folder, self.auto_class), arch.lora)
        unpack_pretrained(folder, out_dir, self.wrapper(hf_model))
