"""From a model spec in the config to a trained, self-contained model folder.

The folder holds everything needed to use the model: the weights (model.pt +
model_config.json, or ngram.npz), the SentencePiece model and `seqmodels.json` (model type,
task and decoding settings). `seqmodels.predictor.load_predictor` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from seqmodels import BOS_ID, EOS_ID, UNK_ID
from seqmodels.config import ModelSpec
from seqmodels.data import encode_lines, language_model_stream, read_split
from seqmodels.vocab import load_sentencepiece

NGRAM_FIELDS = ("order",)
META_FILE = "seqmodels.json"


def _model_config_class(model_type: str) -> type | None:
    from seqmodels.lm_models import RNNLMConfig, TransformerLMConfig
    from seqmodels.seq2seq_models import LSTMSeq2SeqConfig, TransformerSeq2SeqConfig

    return {
        "lstm_lm": RNNLMConfig,
        "gru_lm": RNNLMConfig,
        "transformer_lm": TransformerLMConfig,
        "lstm_seq2seq": LSTMSeq2SeqConfig,
        "transformer_seq2seq": TransformerSeq2SeqConfig,
    }.get(model_type)


def check_model_spec(name: str, spec: ModelSpec) -> None:
    """Refuse unknown architecture/training keys with a message naming model and key."""
    from seqmodels.training import TrainConfig

    cls = _model_config_class(spec.type)
    allowed = set(NGRAM_FIELDS) if cls is None else {f.name for f in dataclasses.fields(cls)}
    allowed -= {"vocab_size", "cell"}  # set from the vocabulary and the model type
    for key in spec.architecture:
        if key not in allowed:
            raise ValueError(
                f"model {name!r} ({spec.type}): unknown architecture key {key!r}; "
                f"known: {', '.join(sorted(allowed))}"
            )
    if cls is None:
        if spec.training:
            raise ValueError(f"model {name!r}: an n-gram model takes no training settings")
        return
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in spec.training:
        if key not in known:
            raise ValueError(
                f"model {name!r}: unknown training key {key!r}; known: {', '.join(sorted(known))}"
            )
    defaults = {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }
    _check_sizes(name, {**defaults, **spec.architecture})


def _check_sizes(name: str, arch: dict[str, Any]) -> None:
    """Sizes that would only fail once training starts, refused while the config is read."""
    for key, value in arch.items():
        if key != "dropout" and type(value) in (int, float) and value <= 0:
            raise ValueError(f"model {name!r}: {key} must be positive, got {value}")
    if "dropout" in arch and not 0 <= arch["dropout"] < 1:
        raise ValueError(f"model {name!r}: dropout must be in [0, 1), got {arch['dropout']}")
    heads = arch.get("n_head")
    if heads and "d_model" in arch and arch["d_model"] % heads:
        raise ValueError(
            f"model {name!r}: d_model {arch['d_model']} is not divisible by n_head {heads}"
        )


def _write_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    tmp = out_dir / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out_dir / META_FILE)


def train_model(
    spec: ModelSpec,
    task: str,
    parquet: Path,
    spm_model: Path,
    out_dir: Path,
    decoding: dict[str, Any] | None = None,
    on_metrics=None,
) -> dict[str, Any]:
    """Train one model of the experiment on the train split (valid split for validation).

    Returns a summary (parameters, steps, time, tokens/s, device, ...). `seqmodels.json` is
    written last, so a folder without it is an unfinished model.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    sp = load_sentencepiece(spm_model)
    vocab_size = sp.vocab_size()
    shutil.copyfile(spm_model, out_dir / "spm.model")
    started = time.perf_counter()
    if spec.type == "ngram":
        summary = _train_ngram(spec, parquet, sp, vocab_size, out_dir)
    elif task == "language_model":
        summary = _train_neural_lm(spec, parquet, sp, vocab_size, out_dir, on_metrics)
    else:
        summary = _train_seq2seq(spec, parquet, sp, vocab_size, out_dir, on_metrics)
    summary.setdefault("train_time_s", time.perf_counter() - started)
    summary["vocab_size"] = vocab_size
    _write_meta(out_dir, {"type": spec.type, "task": task, "decoding": decoding or {}})
    return summary


def _train_ngram(spec: ModelSpec, parquet: Path, sp, vocab_size: int, out_dir: Path) -> dict:
    from seqmodels.ngram import KneserNeyLM

    order = int(spec.architecture.get("order", 5))
    sentences = encode_lines(sp, read_split(parquet, "train", ["text"])["text"])
    started = time.perf_counter()
    model = KneserNeyLM.fit(sentences, order, vocab_size, BOS_ID, EOS_ID, UNK_ID)
    model.save(out_dir / "ngram.npz")
    valid = encode_lines(sp, read_split(parquet, "valid", ["text"])["text"])
    summary: dict[str, Any] = {
        "train_time_s": time.perf_counter() - started,
        "n_parameters": int(sum(len(k) for k in model.keys)),  # stored n-grams
        "train_tokens": int(sum(len(s) + 1 for s in sentences)),
        "device": "cpu",
    }
    if valid:
        nll, n = model.total_nll(valid)
        summary["best_valid_loss"] = nll / n
    return summary


def _train_config(spec: ModelSpec, **defaults: Any):
    from seqmodels.training import TrainConfig

    return TrainConfig(**{**defaults, **spec.training})


def _result_summary(result) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "train_time_s": result.train_time_s,
        "tokens_per_s": result.tokens_per_s,
        "best_valid_loss": result.best_valid_loss,
        "n_parameters": result.n_parameters,
        "padding_fraction": result.padding_fraction,
        "mfu": result.mfu,
        "resumed_from_step": result.resumed_from_step,
        "stopped_early": float(result.stopped_early),
        "device": result.device,
    }


def _train_neural_lm(
    spec: ModelSpec, parquet: Path, sp, vocab_size: int, out_dir: Path, on_metrics
) -> dict:
    from seqmodels.training import train_language_model

    arch = dict(spec.architecture, vocab_size=vocab_size)
    if spec.type in ("lstm_lm", "gru_lm"):
        arch["cell"] = spec.type.removesuffix("_lm")
    model_config = _model_config_class(spec.type)(**arch)
    defaults = {}
    if hasattr(model_config, "block_size"):
        defaults["block_size"] = model_config.block_size
    cfg = _train_config(spec, **defaults)
    train = language_model_stream(encode_lines(sp, read_split(parquet, "train", ["text"])["text"]))
    valid = language_model_stream(encode_lines(sp, read_split(parquet, "valid", ["text"])["text"]))
    result = train_language_model(model_config, train, valid, cfg, out_dir, on_metrics)
    return {**_result_summary(result), "train_tokens": int(len(train))}


def _train_seq2seq(
    spec: ModelSpec, parquet: Path, sp, vocab_size: int, out_dir: Path, on_metrics
) -> dict:
    from seqmodels.training import train_translation_model

    model_config = _model_config_class(spec.type)(**dict(spec.architecture, vocab_size=vocab_size))
    cfg = _train_config(spec)

    def pairs(split: str) -> list[tuple[np.ndarray, np.ndarray]]:
        rows = read_split(parquet, split, ["src", "tgt"])
        return list(zip(encode_lines(sp, rows["src"]), encode_lines(sp, rows["tgt"]), strict=True))

    train = pairs("train")
    result = train_translation_model(model_config, train, pairs("valid"), cfg, out_dir, on_metrics)
    return {**_result_summary(result), "train_tokens": int(sum(len(t) + 1 for _, t in train))}
