"""Building, training and reloading the neural families in tests the way the families do it
themselves (seqmodels.models.family): a model is a registry type plus its Architecture, and
the vocabulary size is given when it is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from seqmodels.models import FAMILIES
from seqmodels.models.family import identity as family_identity
from seqmodels.models.family import load_weights
from seqmodels.settings import Settings
from seqmodels.training.recipes import train_language_model, train_seq2seq_model
from seqmodels.training.settings import LMTrainSettings, Seq2SeqTrainSettings
from seqmodels.training.trainer import TrainResult


class FamilyArch(NamedTuple):
    """A registered model type (e.g. "transformer_lm") and its architecture settings."""

    type: str
    arch: Settings

    @property
    def family(self):
        return FAMILIES[self.type]


def build(spec: FamilyArch, vocab_size: int, seed: int | None = None) -> nn.Module:
    """A freshly built module (seeded first when `seed` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    return spec.family.build(spec.arch, vocab_size)


def identity(spec: FamilyArch, vocab_size: int) -> dict[str, Any]:
    """What the families record as the model's identity in checkpoints."""
    return family_identity(spec.type, spec.arch, vocab_size)


def train_lm(
    spec: FamilyArch,
    vocab_size: int,
    train_ids: np.ndarray,
    *,
    valid_ids: np.ndarray,
    cfg: LMTrainSettings,
    out_dir: Path,
    **kw,
) -> TrainResult:
    """train_language_model as NeuralLMFamily.train calls it, on id streams."""
    return train_language_model(
        lambda: build(spec, vocab_size),
        train_ids,
        valid_ids,
        cfg,
        out_dir,
        model_identity=identity(spec, vocab_size),
        max_context=spec.family.max_context(spec.arch),
        **kw,
    )


def train_s2s(
    spec: FamilyArch,
    vocab_size: int,
    train_pairs: list[tuple[np.ndarray, np.ndarray]],
    *,
    valid_pairs: list[tuple[np.ndarray, np.ndarray]],
    cfg: Seq2SeqTrainSettings,
    out_dir: Path,
    **kw,
) -> TrainResult:
    """train_seq2seq_model as Seq2SeqFamily.train calls it, on id pairs."""
    return train_seq2seq_model(
        lambda: build(spec, vocab_size),
        train_pairs,
        valid_pairs,
        cfg,
        out_dir,
        model_identity=identity(spec, vocab_size),
        max_positions=spec.family.max_positions(spec.arch),
        **kw,
    )


def load_trained(spec: FamilyArch, vocab_size: int, out_dir: Path) -> nn.Module:
    """A trained weights folder (out_dir/model.pt) rebuilt on the CPU, in eval mode."""
    return load_weights(build(spec, vocab_size), out_dir, device="cpu")


def make_tiny_gpt2(folder: Path, lines: list[str]) -> Path:
    """A random GPT-2 and a byte-level BPE tokenizer trained on `lines`, in save_pretrained
    layout: what a user would download from the hub, at a test's size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(lines * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
