"""The training loop shared by every model (see seqmodels.training for the settings).

One optimizer step: grad_accum_steps batches (this rank's slices of the global batch under
DDP), token losses summed and divided by the global token count, clipping, AdamW. Around it:
validation with best-weights selection and early stopping, full-state checkpoints that a
re-run resumes bit-exactly, pruning and averaging of checkpoints, tokens/s and MFU.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from seqmodels import distributed
from seqmodels.batching import Batch
from seqmodels.checkpoint import (
    CHECKPOINT_DIR,
    average_checkpoints,
    clear_checkpoints,
    config_hash,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from seqmodels.flops import peak_flops
from seqmodels.training import (
    RESUME_FREE_FIELDS,
    MetricsCallback,
    ScoreFn,
    TrainConfig,
    TrainResult,
    _autocast,
    _make_optimizer,
    arch_name,
    build_model,
    lr_at,
    resolve_device,
    save_model_config,
    save_weights,
)

log = logging.getLogger(__name__)

# `loss_fn(model, batch, smoothing)` returns the summed token loss and the number of
# predicted tokens, so means can be taken over many batches (and ranks).
LossFn = Callable[[nn.Module, Batch, float], tuple[torch.Tensor, int]]


def _evaluate(model, valid_batches: list[Batch], loss_fn: LossFn, device) -> tuple[float, int]:
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad(), _autocast(device):
        for batch in valid_batches:
            loss, k = loss_fn(model, tuple(t.to(device) for t in batch), 0.0)
            total += float(loss)
            n += k
    model.train()
    return total, n


@dataclass
class _Progress:
    """The trainer's bookkeeping, saved in checkpoints (plain numbers and lists only)."""

    step: int = 0
    best_loss: float = math.inf
    best_metric: float = -math.inf  # higher is better: -valid loss, or the valid score
    best_score: float | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    saved: bool = False  # model.pt holds best-validation weights
    last_eval: int = -1
    last_ckpt: int = -1
    train_s: float = 0.0
    train_tokens: int = 0
    log_loss: float = 0.0
    log_tokens: int = 0
    log_steps: int = 0
    log_s: float = 0.0
    valid_metrics: list = field(default_factory=list)  # [step, metric] per validation


def _find_resumable(ckpt_dir: Path, run_hash: str) -> dict[str, Any] | None:
    for step, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            ck = load_checkpoint(path)
        except Exception as e:  # damaged file: try the one before
            log.warning("cannot read checkpoint %s (%s)", path, e)
            continue
        if ck.get("config_hash") != run_hash:
            log.warning("%s holds checkpoints of another config or data; starting afresh", ckpt_dir)
            return None
        log.info("resuming from %s (step %d)", path, step)
        return ck
    return None


def fit(
    model_config,
    make_batches: Callable[[int, int], Iterator[tuple[Batch, int]]],
    valid_batches: list[Batch],
    loss_fn: LossFn,
    cfg: TrainConfig,
    out_dir: Path,
    on_metrics: MetricsCallback | None,
    valid_score_fn: ScoreFn | None = None,
    data_fingerprint: str = "",
    flops_fn: Callable[[nn.Module], float] | None = None,
) -> TrainResult:
    """Train; `make_batches(rank, world)` returns a resumable batch iterator (batching.py)."""
    if cfg.grad_accum_steps < 1:
        raise ValueError("grad_accum_steps must be >= 1")
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    ctx, device = distributed.setup(resolve_device(cfg.device))
    main = ctx.is_main
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    raw = build_model(model_config).to(device)  # unwrapped: saved, validated, averaged
    raw.train()
    n_params = sum(p.numel() for p in raw.parameters())
    log.info("%s: %.2fM parameters on %s", arch_name(model_config), n_params / 1e6, device)
    flops_per_token = flops_fn(raw) if flops_fn else 0.0
    opt = _make_optimizer(raw, cfg, device)
    # Loss scaling is for fp16, which we do not use (bf16 on CUDA, fp32 on CPU); the scaler
    # stays disabled but its state is checkpointed so an fp16 variant would resume correctly.
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    batches = make_batches(ctx.rank, ctx.world)
    pad_fraction = getattr(batches, "padding_fraction", None)  # seq2seq only

    ckpt_dir = out_dir / CHECKPOINT_DIR
    ckpt_every = cfg.eval_every if cfg.checkpoint_every is None else cfg.checkpoint_every
    trajectory = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE_FIELDS}
    run_hash = config_hash(
        arch_name(model_config), asdict(model_config), trajectory, data_fingerprint
    )
    p = _Progress()
    ck = _find_resumable(ckpt_dir, run_hash) if cfg.resume and ckpt_every > 0 else None
    if ctx.world > 1:  # all ranks must continue from rank 0's choice
        found = ck["step"] if ck is not None else -1
        if distributed.broadcast_float(found, ctx, device) != found:
            raise RuntimeError(
                f"rank {ctx.rank} sees another checkpoint (step {found}) than rank 0 in "
                f"{ckpt_dir}: multi-node runs need out_dir on a shared filesystem"
            )
    distributed.barrier(ctx)  # every rank has looked before rank 0 clears anything
    if ck is not None:
        raw.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        batches.load_state_dict(ck["data"])
        set_rng_state(ck["rng"])
        known = {f.name for f in fields(_Progress)}
        p = _Progress(**{k: v for k, v in ck["progress"].items() if k in known})
        if main:
            remove_temp_files(ckpt_dir)
    elif main:
        (out_dir / "model.pt").unlink(missing_ok=True)  # never pair old weights with this run
        clear_checkpoints(ckpt_dir)
    resumed_from = p.step
    if main:
        save_model_config(model_config, out_dir)

    model = ddp = raw
    if ctx.world > 1:
        if ctx.rank > 0:  # different dropout masks per rank (rank 0 keeps the seed's stream)
            torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank + p.step)
        ids = [device.index] if device.type == "cuda" else None
        model = ddp = nn.parallel.DistributedDataParallel(raw, device_ids=ids)
    if cfg.compile:
        model = torch.compile(model)

    def validate() -> None:
        p.last_eval = p.step
        if not valid_batches and valid_score_fn is None:
            return
        metrics: dict[str, float] = {}
        loss = math.nan
        if valid_batches:  # each rank scores its share, then the sums are combined
            total, n = _evaluate(raw, valid_batches[ctx.rank :: ctx.world], loss_fn, device)
            total, n = distributed.all_reduce_sum([total, n], ctx, device)
            loss = total / max(n, 1)
            metrics = {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0))}
            p.best_loss = min(p.best_loss, loss)
        score = None
        if valid_score_fn is not None:
            if main:  # e.g. BLEU by decoding: rank 0 scores, the others get its number
                raw.eval()
                with torch.no_grad():
                    score = float(valid_score_fn(raw))
                raw.train()
            score = distributed.broadcast_float(score if main else 0.0, ctx, device)
            metrics["valid_score"] = score
        log.info("step %d: %s", p.step, {k: round(v, 4) for k, v in metrics.items()})
        if main and on_metrics:
            on_metrics(metrics, p.step)
        metric = score if score is not None else -loss
        p.valid_metrics.append([p.step, metric])
        if metric > p.best_metric:  # False for NaN: a diverged model is never kept
            p.best_metric, p.best_score, p.bad_evals, p.saved = metric, score, 0, True
            if main:
                save_weights(raw, out_dir)
        else:
            p.bad_evals += 1
            if cfg.early_stop_patience and p.bad_evals >= cfg.early_stop_patience:
                p.stopped_early = True
                log.info("early stop at step %d: %d validations without gain", p.step, p.bad_evals)

    def checkpoint() -> None:
        p.last_ckpt = p.step
        if not main:
            return
        state = {
            "config_hash": run_hash,
            "arch": arch_name(model_config),
            "model_config": asdict(model_config),
            "train_config": asdict(cfg),
            "world_size": ctx.world,
            "step": p.step,
            "schedule": {"step": p.step, "lr": lr_at(max(p.step, 1), cfg)},
            "model": {k: v.detach().cpu() for k, v in raw.state_dict().items()},
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
            "data": batches.state_dict(),
            "progress": asdict(p),
        }
        save_checkpoint(ckpt_dir, p.step, state)
        keep_last = max(cfg.keep_last, cfg.average_last_n, 1)  # resume needs the newest
        prune_checkpoints(ckpt_dir, keep_last, cfg.keep_best, dict(map(tuple, p.valid_metrics)))

    def mfu(tokens_per_s: float) -> float:
        if not flops_per_token:
            return 0.0
        return tokens_per_s * flops_per_token / (ctx.world * peak_flops(device))

    while p.step < cfg.max_steps and not p.stopped_early:
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.grad_accum_steps)]
        n_tokens = sum(n for _, n in micro)
        if ctx.world > 1:
            n_tokens = int(distributed.all_reduce_sum([n_tokens], ctx, device)[0])
        # Sum of token losses / global token count; DDP averages over ranks, hence * world.
        denom = max(n_tokens, 1) / ctx.world
        p.step += 1
        lr = lr_at(p.step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for i, (batch, n) in enumerate(micro):
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            last = i == len(micro) - 1
            with nullcontext() if ctx.world == 1 or last else ddp.no_sync():
                with _autocast(device):
                    loss_sum, _ = loss_fn(model, batch, cfg.label_smoothing)
                    loss = loss_sum / denom if n > 0 else loss_sum * 0.0
                scaler.scale(loss).backward()
            step_loss += loss.detach().float()
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.clip_norm)
        scaler.step(opt)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()  # so dt covers the optimizer step too
        p.log_loss += float(step_loss)
        dt = time.perf_counter() - t0
        p.train_s += dt
        p.train_tokens += n_tokens
        p.log_tokens += n_tokens
        p.log_steps += 1
        p.log_s += dt

        if p.step % cfg.log_every == 0 or p.step == cfg.max_steps:
            log_loss = distributed.all_reduce_sum([p.log_loss], ctx, device)[0] / ctx.world
            tokens_per_s = p.log_tokens / max(p.log_s, 1e-9)
            metrics = {
                "train_loss": log_loss / p.log_steps,
                "lr": lr,
                "tokens_per_s": tokens_per_s,
                "grad_norm": float(grad_norm),
            }
            if flops_per_token:
                metrics["mfu"] = mfu(tokens_per_s)
            if pad_fraction:
                metrics["padding_fraction"] = pad_fraction()
            if main:
                log.info("step %d: %s", p.step, {k: round(v, 5) for k, v in metrics.items()})
                if on_metrics:
                    on_metrics(metrics, p.step)
            p.log_loss, p.log_tokens, p.log_steps, p.log_s = 0.0, 0, 0, 0.0
        if p.step % cfg.eval_every == 0:
            validate()
        if ckpt_every > 0 and p.step % ckpt_every == 0:
            checkpoint()
        if cfg.max_train_minutes is not None:
            over = (time.perf_counter() - t_start) / 60 >= cfg.max_train_minutes
            if distributed.broadcast_float(float(over), ctx, device):  # ranks stop together
                log.warning("stopping at step %d: max_train_minutes reached", p.step)
                break
    if p.last_eval != p.step:
        validate()
    if ckpt_every > 0 and p.last_ckpt != p.step:
        checkpoint()
    if main and not p.saved:  # no validation data (or a non-finite loss): final weights
        save_weights(raw, out_dir)
    if main and cfg.average_last_n > 1:
        paths = [path for _, path in list_checkpoints(ckpt_dir)[-cfg.average_last_n :]]
        if len(paths) < cfg.average_last_n:
            log.warning("averaging %d checkpoints, fewer than %d", len(paths), cfg.average_last_n)
        if paths:
            save_weights(raw, out_dir, average_checkpoints(paths))
    distributed.barrier(ctx)  # model.pt is complete before any rank returns

    tokens_per_s = p.train_tokens / max(p.train_s, 1e-9)
    return TrainResult(
        model_dir=out_dir,
        steps=p.step,
        train_time_s=time.perf_counter() - t_start,
        tokens_per_s=tokens_per_s,
        best_valid_loss=p.best_loss,
        n_parameters=n_params,
        device=str(device),
        padding_fraction=pad_fraction() if pad_fraction else 0.0,
        mfu=mfu(tokens_per_s) if p.train_s > 0 else 0.0,
        best_valid_score=p.best_score,
        resumed_from_step=resumed_from,
        stopped_early=p.stopped_early,
    )
