"""One trainer for every neural model: LMs on a token stream, seq2seq on sentence pairs.

Settings (TrainConfig), model building and the two entry points live here; the loop is in
seqmodels.trainer. AdamW (fused on CUDA), bf16 autocast on CUDA, warmup + inverse-sqrt or
cosine schedule, gradient clipping and accumulation, validation every `eval_every` steps and
at the end with the best-validation weights kept in out_dir/model.pt, early stopping,
full-state checkpoints in out_dir/checkpoints that a re-run resumes exactly
(seqmodels.checkpoint), averaging of the last checkpoints, tokens/s and MFU
(seqmodels.flops), and data parallelism under torchrun (seqmodels.distributed).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqmodels import PAD_ID
from seqmodels.batching import (
    Batch,
    LMBatches,
    PairBatches,
    lm_valid_batches,
    pair_valid_batches,
    prepare_pairs,
)
from seqmodels.batching import collate as _collate  # noqa: F401  (old import path)
from seqmodels.batching import token_batches as _token_batches  # noqa: F401  (old import path)
from seqmodels.checkpoint import array_fingerprint, atomic_write
from seqmodels.flops import train_flops_per_token
from seqmodels.lm_models import (
    RNNLanguageModel,
    RNNLMConfig,
    TransformerLanguageModel,
    TransformerLMConfig,
)
from seqmodels.seq2seq_models import (
    LSTMAttentionSeq2Seq,
    LSTMSeq2SeqConfig,
    TransformerSeq2Seq,
    TransformerSeq2SeqConfig,
)

log = logging.getLogger(__name__)

# arch name written to model_config.json -> (config dataclass, model class)
ARCHS: dict[str, tuple[type, type[nn.Module]]] = {
    "rnn_lm": (RNNLMConfig, RNNLanguageModel),
    "transformer_lm": (TransformerLMConfig, TransformerLanguageModel),
    "lstm_seq2seq": (LSTMSeq2SeqConfig, LSTMAttentionSeq2Seq),
    "transformer_seq2seq": (TransformerSeq2SeqConfig, TransformerSeq2Seq),
}

MetricsCallback = Callable[[dict[str, float], int], None]
ScoreFn = Callable[[nn.Module], float]  # model (eval mode, no grad) -> higher-is-better score


@dataclass
class TrainConfig:
    max_steps: int = 2000  # optimizer steps
    batch_tokens: int = 4096  # LM: batch = batch_tokens // block_size windows; seq2seq: padded
    lr: float = 1e-3  # peak learning rate, reached after warmup
    warmup_steps: int = 200
    schedule: str = "inverse_sqrt"  # "inverse_sqrt" | "cosine"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    label_smoothing: float = 0.1  # seq2seq only; validation loss is always unsmoothed
    eval_every: int = 500
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    block_size: int = 128  # LM context length (Transformer: capped at its block_size)
    max_seq_len: int = 200  # seq2seq: longer training pairs are skipped, validation truncated
    valid_max_tokens: int | None = None  # cap on validation tokens, to bound eval time
    max_train_minutes: float | None = None  # wall-clock safety net (per invocation)
    # A step sums the gradients of grad_accum_steps batches (the global batch under DDP),
    # normalised by their total token count: one big batch of grad_accum_steps * batch_tokens.
    grad_accum_steps: int = 1
    checkpoint_every: int | None = None  # steps; None: at every validation; 0: no checkpoints
    keep_last: int = 2  # newest checkpoints kept (at least 1, and at least average_last_n)
    keep_best: int = 1  # best checkpoints kept by the validation metric
    resume: bool = True  # continue from out_dir/checkpoints when config and data match
    early_stop_patience: int | None = None  # validations without improvement before stopping
    average_last_n: int = 1  # > 1: model.pt = mean weights of the last n checkpoints
    compile: bool = False  # torch.compile the model (CUDA mostly; slow to start)


# Fields that change neither the weights trajectory nor the data, so a run may resume after
# changing them (e.g. raising max_train_minutes or the patience).
RESUME_FREE_FIELDS = {
    "log_every",
    "device",
    "max_train_minutes",
    "checkpoint_every",
    "keep_last",
    "keep_best",
    "resume",
    "early_stop_patience",
    "average_last_n",
    "compile",
}


@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    train_time_s: float  # wall clock of this invocation, validation included
    tokens_per_s: float  # predicted (target) tokens per second of training steps, all ranks
    best_valid_loss: float
    n_parameters: int
    device: str
    padding_fraction: float  # seq2seq: pad share of the src+tgt batch tensors; LM: 0
    mfu: float = 0.0  # model FLOPs utilisation of training steps (seqmodels.flops)
    best_valid_score: float | None = None  # best valid_score_fn value, when one is given
    resumed_from_step: int = 0  # 0: started from scratch
    stopped_early: bool = False


def arch_name(config) -> str:
    for name, (cfg_cls, _) in ARCHS.items():
        if type(config) is cfg_cls:
            return name
    raise TypeError(f"not a model config: {type(config).__name__}")


def build_model(config) -> nn.Module:
    return ARCHS[arch_name(config)][1](config)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_atomic_write = atomic_write  # old name


def save_model_config(config, out_dir: Path) -> None:
    text = json.dumps({"arch": arch_name(config), "config": asdict(config)}, indent=2)
    atomic_write(out_dir / "model_config.json", lambda p: Path(p).write_text(text + "\n"))


def save_weights(model: nn.Module, out_dir: Path, state: dict | None = None) -> None:
    if state is None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(out_dir / "model.pt", lambda p: torch.save(state, p))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for 1-based `step`: linear warmup, then the chosen decay."""
    warmup = max(cfg.warmup_steps, 1)
    if step < warmup:
        return cfg.lr * step / warmup
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * math.sqrt(warmup / step)
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
        ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.lr * ratio
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def _make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device):
    # No decay on biases and LayerNorm gains (1-D); matrices and embeddings are decayed.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, **extra)


def _autocast(device: torch.device):
    # bf16 autocast on CUDA only; CPU bf16 matmuls are slower than fp32 on most CPUs.
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )


# --- language models ------------------------------------------------------------------


def _lm_loss(model, batch: Batch, smoothing: float) -> tuple[torch.Tensor, int]:
    # Language models are judged by their likelihood, so they train on the true NLL:
    # `smoothing` (label_smoothing) applies to translation models only.
    x, y = batch
    logits, _ = model(x)
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), y.flatten(), ignore_index=PAD_ID, reduction="sum"
    )
    return loss, int((y != PAD_ID).sum())


def train_language_model(
    model_config: RNNLMConfig | TransformerLMConfig,
    train_ids: np.ndarray,
    valid_ids: np.ndarray,
    cfg: TrainConfig,
    out_dir: Path,
    on_metrics: MetricsCallback | None = None,
    valid_score_fn: ScoreFn | None = None,
) -> TrainResult:
    """Train an LM on one flat id stream (lines' pieces each followed by EOS, starting
    with EOS). Validation loss is the mean NLL per predicted token (nats); the best
    checkpoint is chosen by it, or by `valid_score_fn(model)` (higher is better) if given."""
    train_ids = np.asarray(train_ids)
    valid_ids = np.asarray(valid_ids)
    block = cfg.block_size
    if isinstance(model_config, TransformerLMConfig):
        block = min(block, model_config.block_size)
    if len(train_ids) < block + 2:
        block = len(train_ids) - 2
        log.warning("training stream shorter than block_size; using block %d", block)
    if block < 1:
        raise ValueError("training stream too short")
    if cfg.valid_max_tokens is not None:
        valid_ids = valid_ids[: cfg.valid_max_tokens + 1]
    batch_size = max(1, cfg.batch_tokens // block)
    from seqmodels.trainer import fit  # here: trainer imports this module

    return fit(
        model_config,
        lambda rank, world: LMBatches(train_ids, block, batch_size, cfg.seed, rank, world),
        lm_valid_batches(valid_ids, block, batch_size) if len(valid_ids) > 1 else [],
        _lm_loss,
        cfg,
        out_dir,
        on_metrics,
        valid_score_fn,
        data_fingerprint=array_fingerprint([train_ids, valid_ids]),
        flops_fn=lambda model: train_flops_per_token(model, block),
    )


# --- translation models ----------------------------------------------------------------


def _s2s_loss(model, batch: Batch, smoothing: float) -> tuple[torch.Tensor, int]:
    src, src_mask, tgt_in, tgt_out = batch
    logits = model(src, src_mask, tgt_in)
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(),
        tgt_out.flatten(),
        ignore_index=PAD_ID,
        label_smoothing=smoothing,
        reduction="sum",
    )
    return loss, int((tgt_out != PAD_ID).sum())


def train_translation_model(
    model_config: LSTMSeq2SeqConfig | TransformerSeq2SeqConfig,
    train_pairs: list[tuple[np.ndarray, np.ndarray]],
    valid_pairs: list[tuple[np.ndarray, np.ndarray]],
    cfg: TrainConfig,
    out_dir: Path,
    on_metrics: MetricsCallback | None = None,
    valid_score_fn: ScoreFn | None = None,
) -> TrainResult:
    """Train a seq2seq model on (src ids, tgt ids) pairs given without bos/eos.
    Validation loss is the mean unsmoothed NLL per target token (EOS included); the best
    checkpoint is chosen by it, or by `valid_score_fn(model)` (e.g. BLEU) if given."""
    max_len = cfg.max_seq_len
    if isinstance(model_config, TransformerSeq2SeqConfig):
        max_len = min(max_len, model_config.max_positions)
    srcs, tgts = prepare_pairs(train_pairs, max_len, truncate=False)
    if not srcs:
        raise ValueError("no training pairs left after length filtering")
    if len(srcs) < len(train_pairs):
        log.info("skipped %d pairs longer than %d tokens", len(train_pairs) - len(srcs), max_len)

    v_srcs, v_tgts = prepare_pairs(valid_pairs, max_len, truncate=True)
    if cfg.valid_max_tokens is not None:
        keep = np.cumsum([len(t) - 1 for t in v_tgts]) <= cfg.valid_max_tokens
        v_srcs = [s for s, k in zip(v_srcs, keep, strict=True) if k]
        v_tgts = [t for t, k in zip(v_tgts, keep, strict=True) if k]
    lens = [np.array([len(x) for x in xs]) for xs in (srcs, tgts, v_srcs, v_tgts)]
    fingerprint = array_fingerprint([np.concatenate(srcs), np.concatenate(tgts), *lens])
    src_len, tgt_len = float(lens[0].mean()), float(lens[1].mean() - 1)
    from seqmodels.trainer import fit  # here: trainer imports this module

    return fit(
        model_config,
        lambda rank, world: PairBatches(srcs, tgts, cfg.batch_tokens, cfg.seed, rank, world),
        pair_valid_batches(v_srcs, v_tgts, cfg.batch_tokens) if v_srcs else [],
        _s2s_loss,
        cfg,
        out_dir,
        on_metrics,
        valid_score_fn,
        data_fingerprint=fingerprint,
        flops_fn=lambda model: train_flops_per_token(model, 0, src_len, tgt_len),
    )
