"""The two training recipes: a language model on a token stream, a sequence-to-sequence model
on sentence pairs. Each turns its data into batches and a loss, then runs the shared loop
(trainer.fit). Families call these with a function that builds their model."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqmodels.training.batching import (
    IGNORE_TARGET,
    Batch,
    LMBatches,
    MaskedLMBatches,
    Masking,
    PairBatches,
    PairFraming,
    lm_valid_batches,
    masked_valid_batches,
    pair_valid_batches,
    prepare_pairs,
)
from seqmodels.training.checkpoint import array_fingerprint
from seqmodels.training.settings import LMTrainSettings, Seq2SeqTrainSettings
from seqmodels.training.trainer import (
    FitJob,
    MetricsCallback,
    ProgressCallback,
    ScoreFn,
    TrainResult,
    fit,
)

log = logging.getLogger(__name__)
DEFAULT_BLOCK = 128  # LM training context when neither the settings nor the model set one


def lm_loss(model: nn.Module, batch: Batch, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # Language models are judged by their likelihood, so they train on the true NLL (no
    # label smoothing). Every LM maps ids (B, T) to (logits, state).
    # Only padding targets are ignored (IGNORE_TARGET, not PAD_ID: with a pretrained
    # checkpoint's tokenizer, id 0 is a real token).
    x, y = batch
    logits, _ = model(x)
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_TARGET, reduction="sum"
    )
    return loss, (y != IGNORE_TARGET).sum()  # a tensor: no host sync (see trainer.LossFn)


def train_language_model(
    build_model: Callable[[], nn.Module],
    train_ids: np.ndarray,
    valid_ids: np.ndarray,
    cfg: LMTrainSettings,
    out_dir: Path,
    *,
    model_identity: dict[str, Any],
    max_context: int | None = None,
    on_metrics: MetricsCallback | None = None,
    on_progress: ProgressCallback | None = None,
    valid_score_fn: ScoreFn | None = None,
    masking: Masking | None = None,
) -> TrainResult:
    """Train an LM on one flat id stream (lines' pieces each followed by EOS, starting with
    EOS). Windows are cfg.block_size long (else max_context, else 128), capped at the model's
    max_context. Validation loss is the mean NLL per predicted token (nats).

    With `masking` the model is a masked LM: it predicts the masked tokens of each window
    (a new masking per batch; one fixed masking of the validation windows)."""
    train_ids, valid_ids = np.asarray(train_ids), np.asarray(valid_ids)
    block = cfg.block_size or max_context or DEFAULT_BLOCK
    if max_context is not None:
        block = min(block, max_context)
    if len(train_ids) < block + 2:
        block = len(train_ids) - 2
        log.warning("training stream shorter than block_size; using block %d", block)
    if block < 1:
        raise ValueError("training stream too short")
    if cfg.valid_max_tokens is not None:
        valid_ids = valid_ids[: cfg.valid_max_tokens + 1]
    batch_size = max(1, cfg.batch_tokens // block)
    valid = lm_valid_batches(valid_ids, block, batch_size) if len(valid_ids) > 1 else []

    # Tokens/s counts predicted tokens: a masked LM predicts `probability` of its inputs.
    predicted_share = 1.0 if masking is None else masking.probability

    def make_batches(rank: int, world: int):
        windows = LMBatches(train_ids, block, batch_size, cfg.seed, rank=rank, world=world)
        return windows if masking is None else MaskedLMBatches(windows, masking)

    job = FitJob(
        build_model=build_model,
        make_batches=make_batches,
        valid_batches=valid if masking is None else masked_valid_batches(valid, masking),
        loss_fn=lm_loss,
        settings=cfg,
        out_dir=out_dir,
        model_identity=model_identity,
        data_fingerprint=array_fingerprint([train_ids, valid_ids]),
        flops_per_token=lambda model: model.flops_per_token(block) / predicted_share,
        on_metrics=on_metrics,
        on_progress=on_progress,
        valid_score_fn=valid_score_fn,
    )
    return fit(job)


def seq2seq_loss(smoothing: float):
    """The loss of a seq2seq model: label-smoothed in training, plain NLL in validation."""

    def loss_fn(
        model: nn.Module, batch: Batch, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        src, src_mask, tgt_in, tgt_out = batch
        logits = model(src, src_mask, tgt_in)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            tgt_out.flatten(),
            ignore_index=IGNORE_TARGET,
            label_smoothing=smoothing if training else 0.0,
            reduction="sum",
        )
        return loss, (tgt_out != IGNORE_TARGET).sum()

    return loss_fn


def train_seq2seq_model(
    build_model: Callable[[], nn.Module],
    train_pairs: list[tuple[np.ndarray, np.ndarray]],
    valid_pairs: list[tuple[np.ndarray, np.ndarray]],
    cfg: Seq2SeqTrainSettings,
    out_dir: Path,
    *,
    model_identity: dict[str, Any],
    max_positions: int | None = None,
    framing: PairFraming = PairFraming(),
    on_metrics: MetricsCallback | None = None,
    on_progress: ProgressCallback | None = None,
    valid_score_fn: ScoreFn | None = None,
) -> TrainResult:
    """Train a seq2seq model on (src ids, tgt ids) pairs given without special tokens (the
    `framing` adds them). Pairs longer than cfg.max_seq_len (or the model's max_positions)
    are skipped; validation pairs are truncated. Validation loss is the mean unsmoothed NLL
    per target token (EOS included)."""
    max_len = cfg.max_seq_len if max_positions is None else min(cfg.max_seq_len, max_positions)
    srcs, tgts = prepare_pairs(train_pairs, max_len, truncate=False, framing=framing)
    if not srcs:
        raise ValueError("no training pairs left after length filtering")
    if len(srcs) < len(train_pairs):
        log.info("skipped %d pairs longer than %d tokens", len(train_pairs) - len(srcs), max_len)
    v_srcs, v_tgts = prepare_pairs(valid_pairs, max_len, truncate=True, framing=framing)
    if cfg.valid_max_tokens is not None:
        keep = np.cumsum([len(t) - 1 for t in v_tgts]) <= cfg.valid_max_tokens
        v_srcs = [s for s, k in zip(v_srcs, keep, strict=True) if k]
        v_tgts = [t for t, k in zip(v_tgts, keep, strict=True) if k]
    lens = [np.array([len(x) for x in xs]) for xs in (srcs, tgts, v_srcs, v_tgts)]
    src_len, tgt_len = float(lens[0].mean()), float(lens[1].mean() - 1)
    job = FitJob(
        build_model=build_model,
        make_batches=lambda rank, world: PairBatches(
            srcs, tgts, cfg.batch_tokens, cfg.seed, rank=rank, world=world, pad_id=framing.pad_id
        ),
        valid_batches=(
            pair_valid_batches(v_srcs, v_tgts, cfg.batch_tokens, framing.pad_id) if v_srcs else []
        ),
        loss_fn=seq2seq_loss(cfg.label_smoothing),
        settings=cfg,
        out_dir=out_dir,
        model_identity=model_identity,
        data_fingerprint=array_fingerprint([np.concatenate(srcs), np.concatenate(tgts), *lens]),
        flops_per_token=lambda model: model.flops_per_token(src_len, tgt_len),
        on_metrics=on_metrics,
        on_progress=on_progress,
        valid_score_fn=valid_score_fn,
    )
    return fit(job)
