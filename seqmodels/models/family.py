"""What every model family declares, and the shared behaviour of the neural ones.

A family is a kind of model the pipeline can train: it names its task, its typed
`Architecture` and `Training` settings, and knows how to train a model folder and load it
back as a predictor (seqmodels.inference.predictors). Registering a family is one line in
seqmodels/models/__init__.py; nothing outside a family's module looks at its model class.

Neural families only say how to build their `nn.Module`; training (seqmodels.training) and
inference are shared. Their modules follow one of two interfaces:

- language models: `forward(idx, state=None) -> (logits, state)`, `max_context` (None when
  the state carries any context), `state_length(state)` when max_context is set, and
  `flops_per_token(context)`;
- sequence-to-sequence models: `forward(src, src_mask, tgt_in) -> logits`, `encode`,
  `init_state`, `decode_step`, `reorder_state` (seqmodels.inference.decoding drives them),
  `max_positions` (None: unlimited) and `flops_per_token(src_len, tgt_len)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn

from seqmodels import EOS_ID
from seqmodels.data.splits import encode_lines, language_model_stream, read_split
from seqmodels.files import file_sha256, load_sentencepiece
from seqmodels.inference.predictors import NeuralLMPredictor, TranslationPredictor
from seqmodels.settings import Settings
from seqmodels.training.batching import Masking, PairFraming, truncate_sources
from seqmodels.training.recipes import train_language_model, train_seq2seq_model
from seqmodels.training.settings import LMTrainSettings, Seq2SeqTrainSettings
from seqmodels.training.trainer import MetricsCallback, ProgressCallback, resolve_device

LANGUAGE_MODEL = "language_model"
SEQUENCE_TO_SEQUENCE = "sequence_to_sequence"
WEIGHTS_FILE = "model.pt"


@dataclass
class TrainJob:
    """Where a family trains from and to: the cleaned corpus, its vocabulary, the folder."""

    model_type: str  # the registry name, recorded with the checkpoints
    parquet: Path
    spm_model: Path | None  # None when the family brings its own tokenizer
    out_dir: Path
    on_metrics: MetricsCallback | None = None
    on_progress: ProgressCallback | None = None
    # Warm start: weights (model.pt) of a model with the same type, architecture and
    # vocabulary, checked by seqmodels.models.folder before training starts.
    init_weights: Path | None = None


class ModelFamily:
    task: ClassVar[str]  # LANGUAGE_MODEL or SEQUENCE_TO_SEQUENCE
    Architecture: ClassVar[type[Settings]]
    Training: ClassVar[type[Settings]]
    warm_start: ClassVar[bool] = False  # can training start from another model's weights
    # A Hugging Face pipeline task ("text-generation", "translation", "fill-mask") when the
    # family's models are registered with MLflow's transformers flavor; None: the seqmodels
    # pyfunc. Such a family also has `transformers_pipeline` and `load_exported`.
    transformers_task: ClassVar[str | None] = None
    # The model brings its tokenizer (a pretrained checkpoint's): the experiment's
    # SentencePiece model is not used, and the vocab stage is skipped when no model needs it.
    own_tokenizer: ClassVar[bool] = False
    # Language models: "" for a likelihood (test_bits_per_char...), "pll_" for a masked LM's
    # pseudo-log-likelihood (test_pll_bits_per_char...), which is not comparable with it.
    metric_prefix: ClassVar[str] = ""
    # The pipeline may launch its training on several processes (training.distributed).
    distributed_training: ClassVar[bool] = False
    # The CTranslate2 layout of the family's models, for `seqmodels export`: "encoder_decoder"
    # or "decoder" (seqmodels.models.ct2_export fills that spec from the model's weights);
    # None: the family cannot be exported to CTranslate2.
    ctranslate2_layout: ClassVar[str | None] = None

    def preflight(self, arch: Any) -> None:
        """Checks of what lies outside the config (installed packages, a checkpoint to start
        from), run when a config is validated, before any stage; a ValueError says what is
        missing. Most families need nothing."""

    def lineage(self, arch: Any) -> dict[str, str]:
        """Tags a registered version gets beside the pipeline's lineage (a pretrained
        checkpoint's id, commit and weights digest); none for a model trained from scratch."""
        return {}

    def decoding_settings(self, training: Any) -> dict[str, Any]:
        """Settings of how the model was trained that its decoding must repeat (stored with
        the decoding settings of the folder)."""
        return {}

    def train(self, arch: Any, training: Any, job: TrainJob) -> dict[str, Any]:
        """Train into job.out_dir (weights only; the folder's metadata is written by the
        caller); returns a summary of numbers (and a device string) to log."""
        raise NotImplementedError

    def load(self, model_dir: Path, arch: Any, decoding: dict, device: str = "auto"):
        """A predictor (seqmodels.inference.predictors) for a trained folder."""
        raise NotImplementedError

    def vocabulary(self, arch: Any, spm_model: Path | None) -> tuple[str, str]:
        """(digest, where it is) of the vocabulary a new model of `arch` trains with: a warm
        start needs the same one as its parent's."""
        return file_sha256(spm_model), str(spm_model)

    def folder_vocabulary(self, model_dir: Path) -> tuple[str, str]:
        """(digest, where it is) of the vocabulary of a trained folder (see `vocabulary`)."""
        path = Path(model_dir) / "spm.model"
        return file_sha256(path), str(path)

    def unpack_exported(self, folder: Path, arch: Any, out_dir: Path) -> None:
        """Write a model folder's weights and tokenizer (not its seqmodels.json) from a model
        exported by transformers_pipeline, so it can seed a warm start."""
        raise NotImplementedError(f"{type(self).__name__} has no transformers_task")

    def transformers_task_for(self, task: str) -> str | None:
        """The Hugging Face pipeline task of a folder trained for experiment `task`."""
        return self.transformers_task

    def transformers_pipeline(
        self, model_dir: Path, arch: Any, decoding: dict, hf_task: str
    ) -> Any:
        """A Hugging Face pipeline (of `hf_task`) of a trained folder, decoding settings
        included."""
        raise NotImplementedError(f"{type(self).__name__} has no transformers_task")

    def load_exported(self, folder: Path, arch: Any, decoding: dict, device: str = "auto"):
        """A predictor of a model saved as a Hugging Face pipeline (save_pretrained layout:
        the transformers flavor's components)."""
        raise NotImplementedError(f"{type(self).__name__} has no transformers_task")


def load_state(model: nn.Module, weights: Path) -> nn.Module:
    """A weights file (model.pt) into a built model (weights_only: a file cannot run code)."""
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model


def load_weights(model: nn.Module, model_dir: Path, device: str = "auto") -> nn.Module:
    """A folder's model.pt into a freshly built model, on `device`, in eval mode."""
    return load_state(model, Path(model_dir) / WEIGHTS_FILE).to(resolve_device(device)).eval()


def identity(
    model_type: str, arch: Settings, vocab_size: int, init_weights: Path | None = None
) -> dict[str, Any]:
    """What the resume key knows of the model: a warm start is another run than a scratch one."""
    found = {"type": model_type, "architecture": arch.model_dump(), "vocab_size": vocab_size}
    if init_weights is not None:
        found["init_weights_sha256"] = file_sha256(init_weights)
    return found


def builder(build: Callable[[], nn.Module], job: TrainJob) -> Callable[[], nn.Module]:
    """`build`, then (warm start) the weights of job.init_weights loaded into the new model."""
    if job.init_weights is None:
        return build

    return lambda: load_state(build(), job.init_weights)


class NeuralLMFamily(ModelFamily):
    task = LANGUAGE_MODEL
    Training = LMTrainSettings
    warm_start = True
    distributed_training = True

    def build(self, arch: Any, vocab_size: int) -> nn.Module:
        raise NotImplementedError

    def max_context(self, arch: Any) -> int | None:
        """Longest context the model can see (None: unlimited, e.g. recurrent state)."""
        return None

    # Hooks for a family that brings its own tokenizer (a pretrained checkpoint's): anything
    # with SentencePiece's batch `encode` and `vocab_size()`, and its end-of-line id.
    def tokenizer(self, arch: Any, job: TrainJob) -> Any:
        """The tokenizer of the training text (the experiment's SentencePiece model)."""
        return load_sentencepiece(job.spm_model)

    def end_of_line_id(self, tokenizer: Any) -> int:
        """The id that ends every line (and starts the stream) of the LM's token stream."""
        return EOS_ID

    def model_identity(self, arch: Any, job: TrainJob, vocab_size: int) -> dict[str, Any]:
        """What the resume key knows of the model (see `identity`)."""
        return identity(job.model_type, arch, vocab_size, job.init_weights)

    def masking(self, training: Any, tokenizer: Any) -> Masking | None:
        """How a masked LM corrupts its input (None: a causal LM predicts the next token)."""
        return None

    def train(self, arch: Any, training: LMTrainSettings, job: TrainJob) -> dict[str, Any]:
        tok = self.tokenizer(arch, job)
        eos = self.end_of_line_id(tok)

        def stream(split: str) -> np.ndarray:
            lines = read_split(job.parquet, split, ["text"])["text"]
            return language_model_stream(encode_lines(tok, lines), eos)

        train_ids, vocab_size = stream("train"), tok.vocab_size()
        result = train_language_model(
            builder(lambda: self.build(arch, vocab_size), job),
            train_ids,
            stream("valid"),
            training,
            job.out_dir,
            model_identity=self.model_identity(arch, job, vocab_size),
            max_context=self.max_context(arch),
            on_metrics=job.on_metrics,
            on_progress=job.on_progress,
            masking=self.masking(training, tok),
        )
        summary = {**result.summary(), "train_tokens": int(len(train_ids))}
        return {**summary, "vocab_size": vocab_size}

    def load(self, model_dir: Path, arch: Any, decoding: dict, device: str = "auto"):
        sp = load_sentencepiece(Path(model_dir) / "spm.model")
        model = load_weights(self.build(arch, sp.vocab_size()), model_dir, device)
        return NeuralLMPredictor(model, sp)


class Seq2SeqFamily(ModelFamily):
    task = SEQUENCE_TO_SEQUENCE
    Training = Seq2SeqTrainSettings
    warm_start = True
    distributed_training = True

    def build(self, arch: Any, vocab_size: int) -> nn.Module:
        raise NotImplementedError

    def max_positions(self, arch: Any) -> int | None:
        """Longest source/target the model accepts (None: unlimited)."""
        return None

    # Hooks for a family that brings its own tokenizer (a pretrained checkpoint's).
    def tokenizer(self, arch: Any, job: TrainJob) -> Any:
        """The tokenizer of both sides (the experiment's SentencePiece model)."""
        return load_sentencepiece(job.spm_model)

    def encode_pairs(self, arch: Any, tok: Any, rows: dict[str, list[str]]) -> tuple[list, list]:
        """Token ids of the sources and the targets, without special tokens."""
        return encode_lines(tok, rows["src"]), encode_lines(tok, rows["tgt"])

    def framing(self, arch: Any, tok: Any) -> PairFraming:
        """The special ids around each side (SentencePiece's conventions by default)."""
        return PairFraming()

    def model_identity(self, arch: Any, job: TrainJob, vocab_size: int) -> dict[str, Any]:
        """What the resume key knows of the model (see `identity`)."""
        return identity(job.model_type, arch, vocab_size, job.init_weights)

    def decoding_settings(self, training: Seq2SeqTrainSettings) -> dict[str, Any]:
        # Decoding cuts long sources exactly where training did.
        return {"max_source_tokens": training.max_source_tokens}

    def train(self, arch: Any, training: Seq2SeqTrainSettings, job: TrainJob) -> dict[str, Any]:
        tok = self.tokenizer(arch, job)
        truncated = {}

        def pairs(split: str) -> list[tuple[np.ndarray, np.ndarray]]:
            rows = read_split(job.parquet, split, ["src", "tgt"])
            srcs, tgts = self.encode_pairs(arch, tok, rows)
            srcs, truncated[split] = truncate_sources(srcs, training.max_source_tokens)
            return list(zip(srcs, tgts, strict=True))

        train, vocab_size = pairs("train"), tok.vocab_size()
        result = train_seq2seq_model(
            builder(lambda: self.build(arch, vocab_size), job),
            train,
            pairs("valid"),
            training,
            job.out_dir,
            model_identity=self.model_identity(arch, job, vocab_size),
            max_positions=self.max_positions(arch),
            framing=self.framing(arch, tok),
            on_metrics=job.on_metrics,
            on_progress=job.on_progress,
        )
        summary = {**result.summary(), "vocab_size": vocab_size}
        summary.update(
            train_truncated_sources=truncated["train"],
            valid_truncated_sources=truncated["valid"],
        )
        return {**summary, "train_tokens": int(sum(len(t) + 1 for _, t in train))}

    def load(self, model_dir: Path, arch: Any, decoding: dict, device: str = "auto"):
        sp = load_sentencepiece(Path(model_dir) / "spm.model")
        model = load_weights(self.build(arch, sp.vocab_size()), model_dir, device)
        return TranslationPredictor(model, sp, decoding)
