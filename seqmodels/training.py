"""One trainer for every neural model: LMs on a token stream, seq2seq on sentence pairs.

AdamW (fused on CUDA), bf16 autocast on CUDA, warmup + inverse-sqrt or cosine
schedule, gradient clipping, validation every `eval_every` steps and at the end,
and the best-validation weights kept in out_dir/model.pt.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqmodels import BOS_ID, EOS_ID, PAD_ID
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


@dataclass
class TrainConfig:
    max_steps: int = 2000
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
    max_train_minutes: float | None = None  # wall-clock safety net


@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    train_time_s: float  # wall clock of the whole run, validation included
    tokens_per_s: float  # predicted (target) tokens per second of training steps
    best_valid_loss: float
    n_parameters: int
    device: str
    padding_fraction: float  # seq2seq: pad share of the src+tgt batch tensors; LM: 0


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


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temp file in the same directory + os.replace, so a reader never sees
    a half-written file under the final name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_model_config(config, out_dir: Path) -> None:
    text = json.dumps({"arch": arch_name(config), "config": asdict(config)}, indent=2)
    _atomic_write(out_dir / "model_config.json", lambda p: Path(p).write_text(text + "\n"))


def save_weights(model: nn.Module, out_dir: Path) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic_write(out_dir / "model.pt", lambda p: torch.save(state, p))


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


# A batch is (inputs..., targets); `loss_fn(model, batch, smoothing)` returns the summed
# token loss and the number of predicted tokens, so means can be taken over many batches.
Batch = tuple[torch.Tensor, ...]
LossFn = Callable[[nn.Module, Batch, float], tuple[torch.Tensor, int]]


def _evaluate(model, valid_batches: list[Batch], loss_fn: LossFn, device) -> float:
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad(), _autocast(device):
        for batch in valid_batches:
            loss, k = loss_fn(model, tuple(t.to(device) for t in batch), 0.0)
            total += float(loss)
            n += k
    model.train()
    return total / max(n, 1)


def _fit(
    model_config,
    train_batches: Iterator[tuple[Batch, int]],
    valid_batches: list[Batch],
    loss_fn: LossFn,
    cfg: TrainConfig,
    out_dir: Path,
    on_metrics: MetricsCallback | None,
    padding_fraction: Callable[[], float] | None = None,
) -> TrainResult:
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    model = build_model(model_config).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %.2fM parameters on %s", arch_name(model_config), n_params / 1e6, device)
    (out_dir / "model.pt").unlink(missing_ok=True)  # never pair old weights with this config
    save_model_config(model_config, out_dir)
    opt = _make_optimizer(model, cfg, device)

    best, saved = float("inf"), False
    train_s, train_tokens = 0.0, 0
    log_loss, log_tokens, log_steps, log_s = 0.0, 0, 0, 0.0
    step, last_eval = 0, -1

    def validate() -> None:
        nonlocal best, last_eval, saved
        last_eval = step
        if not valid_batches:
            return
        loss = _evaluate(model, valid_batches, loss_fn, device)
        log.info("step %d: valid loss %.4f ppl %.2f", step, loss, math.exp(min(loss, 50)))
        if on_metrics:
            on_metrics({"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0))}, step)
        if loss < best:
            best, saved = loss, True
            save_weights(model, out_dir)

    while step < cfg.max_steps:
        t0 = time.perf_counter()
        batch, n_tokens = next(train_batches)
        batch = tuple(t.to(device, non_blocking=True) for t in batch)
        step += 1
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        with _autocast(device):
            loss_sum, n_pred = loss_fn(model, batch, cfg.label_smoothing)
            loss = loss_sum / max(n_pred, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        opt.step()
        log_loss += float(loss.detach())  # a sync per step; negligible next to the step
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        train_s += dt
        train_tokens += n_tokens
        log_tokens += n_tokens
        log_steps += 1
        log_s += dt

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            metrics = {
                "train_loss": log_loss / log_steps,
                "lr": lr,
                "tokens_per_s": log_tokens / max(log_s, 1e-9),
                "grad_norm": float(grad_norm),
            }
            if padding_fraction is not None:
                metrics["padding_fraction"] = padding_fraction()
            log.info("step %d: %s", step, {k: round(v, 5) for k, v in metrics.items()})
            if on_metrics:
                on_metrics(metrics, step)
            log_loss, log_tokens, log_steps, log_s = 0.0, 0, 0, 0.0
        if step % cfg.eval_every == 0:
            validate()
        minutes = (time.perf_counter() - t_start) / 60
        if cfg.max_train_minutes is not None and minutes >= cfg.max_train_minutes:
            log.warning(
                "stopping at step %d: max_train_minutes=%s reached", step, cfg.max_train_minutes
            )
            break
    if last_eval != step:
        validate()
    if not saved:  # no validation data (or a non-finite loss): keep the final weights
        save_weights(model, out_dir)
    return TrainResult(
        model_dir=out_dir,
        steps=step,
        train_time_s=time.perf_counter() - t_start,
        tokens_per_s=train_tokens / max(train_s, 1e-9),
        best_valid_loss=best,
        n_parameters=n_params,
        device=str(device),
        padding_fraction=padding_fraction() if padding_fraction else 0.0,
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


def _lm_train_batches(ids: np.ndarray, block: int, batch_size: int, seed: int):
    """Random contiguous windows of block+1 tokens (nanoGPT): x = w[:-1], y = w[1:]."""
    rng = np.random.default_rng(seed)
    offsets = np.arange(block + 1)
    while True:
        starts = rng.integers(0, len(ids) - block, size=batch_size)
        w = torch.from_numpy(ids[starts[:, None] + offsets].astype(np.int64))
        yield (w[:, :-1], w[:, 1:]), batch_size * block


def _lm_valid_batches(ids: np.ndarray, block: int, batch_size: int) -> list[Batch]:
    """Non-overlapping windows covering every validation token once (last one padded)."""
    windows_x, windows_y = [], []
    for s in range(0, len(ids) - 1, block):
        x = np.full(block, PAD_ID, dtype=np.int64)
        y = np.full(block, PAD_ID, dtype=np.int64)
        chunk = ids[s : s + block + 1]
        x[: len(chunk) - 1] = chunk[:-1]
        y[: len(chunk) - 1] = chunk[1:]
        windows_x.append(x)
        windows_y.append(y)
    batches = []
    for i in range(0, len(windows_x), batch_size):
        xs = torch.from_numpy(np.stack(windows_x[i : i + batch_size]))
        ys = torch.from_numpy(np.stack(windows_y[i : i + batch_size]))
        batches.append((xs, ys))
    return batches


def train_language_model(
    model_config: RNNLMConfig | TransformerLMConfig,
    train_ids: np.ndarray,
    valid_ids: np.ndarray,
    cfg: TrainConfig,
    out_dir: Path,
    on_metrics: MetricsCallback | None = None,
) -> TrainResult:
    """Train an LM on one flat id stream (lines' pieces each followed by EOS, starting
    with EOS). Validation loss is the mean NLL per predicted token (nats)."""
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
    return _fit(
        model_config,
        _lm_train_batches(train_ids, block, batch_size, cfg.seed),
        _lm_valid_batches(valid_ids, block, batch_size) if len(valid_ids) > 1 else [],
        _lm_loss,
        cfg,
        out_dir,
        on_metrics,
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


def _prepare_pairs(pairs, max_len: int, truncate: bool) -> tuple[list, list]:
    """src -> src + [EOS]; tgt -> [BOS] + tgt + [EOS]. Over-long pairs are truncated
    (validation) or skipped (training)."""
    srcs, tgts = [], []
    for s, t in pairs:
        s = np.asarray(s, dtype=np.int64)
        t = np.asarray(t, dtype=np.int64)
        if len(s) + 1 > max_len or len(t) + 1 > max_len:
            if not truncate:
                continue
            s, t = s[: max_len - 1], t[: max_len - 1]
        srcs.append(np.append(s, EOS_ID))
        tgts.append(np.concatenate([[BOS_ID], t, [EOS_ID]]))
    return srcs, tgts


def _token_batches(src_lens, tgt_lens, batch_tokens: int, rng) -> list[np.ndarray]:
    """Length-bucketed batches of at most batch_tokens = n_sentences * longest side.
    Random tie-breaking within equal lengths and shuffled batch order when rng is given."""
    order = rng.permutation(len(src_lens)) if rng is not None else np.arange(len(src_lens))
    size = np.maximum(src_lens, tgt_lens)[order]
    idx = np.argsort(size, kind="stable")
    order, size = order[idx], size[idx]
    batches, start = [], 0
    for i in range(1, len(order) + 1):
        # Sorted ascending, so the batch's longest item is the one being added.
        if i == len(order) or (i + 1 - start) * size[i] > batch_tokens:
            batches.append(order[start:i])
            start = i
    if rng is not None:
        rng.shuffle(batches)
    return batches


def _collate(srcs, tgts, idx: np.ndarray) -> Batch:
    S = max(len(srcs[i]) for i in idx)
    T = max(len(tgts[i]) for i in idx) - 1
    src = np.full((len(idx), S), PAD_ID, dtype=np.int64)
    tgt = np.full((len(idx), T + 1), PAD_ID, dtype=np.int64)
    for r, i in enumerate(idx):
        src[r, : len(srcs[i])] = srcs[i]
        tgt[r, : len(tgts[i])] = tgts[i]
    src_t, tgt_t = torch.from_numpy(src), torch.from_numpy(tgt)
    return src_t, src_t != PAD_ID, tgt_t[:, :-1], tgt_t[:, 1:]


def train_translation_model(
    model_config: LSTMSeq2SeqConfig | TransformerSeq2SeqConfig,
    train_pairs: list[tuple[np.ndarray, np.ndarray]],
    valid_pairs: list[tuple[np.ndarray, np.ndarray]],
    cfg: TrainConfig,
    out_dir: Path,
    on_metrics: MetricsCallback | None = None,
) -> TrainResult:
    """Train a seq2seq model on (src ids, tgt ids) pairs given without bos/eos.
    Validation loss is the mean unsmoothed NLL per target token (EOS included)."""
    max_len = cfg.max_seq_len
    if isinstance(model_config, TransformerSeq2SeqConfig):
        max_len = min(max_len, model_config.max_positions)
    srcs, tgts = _prepare_pairs(train_pairs, max_len, truncate=False)
    if not srcs:
        raise ValueError("no training pairs left after length filtering")
    if len(srcs) < len(train_pairs):
        log.info("skipped %d pairs longer than %d tokens", len(train_pairs) - len(srcs), max_len)
    src_lens = np.array([len(s) for s in srcs])
    tgt_lens = np.array([len(t) - 1 for t in tgts])
    pad = {"slots": 0, "real": 0}

    def train_batches():
        rng = np.random.default_rng(cfg.seed)
        while True:
            for idx in _token_batches(src_lens, tgt_lens, cfg.batch_tokens, rng):
                batch = _collate(srcs, tgts, idx)
                pad["slots"] += batch[0].numel() + batch[3].numel()
                pad["real"] += int(src_lens[idx].sum() + tgt_lens[idx].sum())
                yield batch, int(tgt_lens[idx].sum())

    v_srcs, v_tgts = _prepare_pairs(valid_pairs, max_len, truncate=True)
    if cfg.valid_max_tokens is not None:
        keep = np.cumsum([len(t) - 1 for t in v_tgts]) <= cfg.valid_max_tokens
        v_srcs = [s for s, k in zip(v_srcs, keep, strict=True) if k]
        v_tgts = [t for t, k in zip(v_tgts, keep, strict=True) if k]
    v_lens = (np.array([len(s) for s in v_srcs]), np.array([len(t) - 1 for t in v_tgts]))
    valid = [
        _collate(v_srcs, v_tgts, idx) for idx in _token_batches(*v_lens, cfg.batch_tokens, None)
    ]
    return _fit(
        model_config,
        train_batches(),
        valid if v_srcs else [],
        _s2s_loss,
        cfg,
        out_dir,
        on_metrics,
        padding_fraction=lambda: 1.0 - pad["real"] / max(pad["slots"], 1),
    )
