"""The training loop shared by every neural model.

One optimizer step: grad_accum_steps batches (this rank's slices of the global batch under
DDP), token losses summed and divided by the global token count, clipping, AdamW (fused on
CUDA) with linear warmup and inverse-sqrt or cosine decay, bf16 autocast on CUDA. Around it:
validation with best-weights selection (out_dir/model.pt) and early stopping, full-state
checkpoints that a re-run resumes bit-exactly (checkpoint.py), pruning and averaging of
checkpoints, tokens/s and MFU (flops.py), data parallelism under torchrun (distributed.py).

`fit(job)` reads top to bottom; the `TrainingRun` methods it calls are the steps of the loop.
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

from seqmodels.files import atomic_write
from seqmodels.training import distributed
from seqmodels.training.batching import Batch
from seqmodels.training.checkpoint import (
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
from seqmodels.training.flops import peak_flops
from seqmodels.training.settings import RESUME_FREE_FIELDS, TrainSettings

log = logging.getLogger(__name__)

# `loss_fn(model, batch, training)` returns the summed token loss and the number of predicted
# tokens, so means can be taken over many batches (and ranks). `training` is False for
# validation, which is always the plain NLL (no label smoothing). The count is a tensor on
# the loss's device: reading it would make the host wait for the forward pass every step
# (torch's sync debug mode found that one sync per step on an H200), and training takes its
# token count from the host-side batcher anyway; validation reads it once.
LossFn = Callable[[nn.Module, Batch, bool], tuple[torch.Tensor, torch.Tensor]]
MetricsCallback = Callable[[dict[str, float], int], None]
ScoreFn = Callable[[nn.Module], float]  # model (eval mode, no grad) -> higher-is-better score


@dataclass
class Progress:
    """What a progress display needs after every optimizer step (rank 0 only)."""

    step: int
    max_steps: int
    loss: float  # mean training loss of this step
    tokens_per_s: float  # since the last log interval started
    elapsed_s: float  # wall clock of this invocation
    resumed_from_step: int = 0

    @property
    def remaining_s(self) -> float:
        done = self.step - self.resumed_from_step
        if done <= 0:
            return math.nan
        return self.elapsed_s / done * (self.max_steps - self.step)


ProgressCallback = Callable[[Progress], None]


@dataclass
class FitJob:
    """Everything `fit` needs: how to build the model, the data, the loss and the settings."""

    build_model: Callable[[], nn.Module]
    make_batches: Callable[[int, int], Iterator[tuple[Batch, int]]]  # (rank, world) -> batches
    valid_batches: list[Batch]
    loss_fn: LossFn
    settings: TrainSettings
    out_dir: Path
    model_identity: dict[str, Any]  # family + architecture: part of the resume key
    data_fingerprint: str = ""  # a checkpoint never resumes on other data
    flops_per_token: Callable[[nn.Module], float] | None = None
    on_metrics: MetricsCallback | None = None
    on_progress: ProgressCallback | None = None
    valid_score_fn: ScoreFn | None = None  # chooses the best weights instead of valid loss


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
    mfu: float = 0.0  # model FLOPs utilisation of training steps (seqmodels.training.flops)
    best_valid_score: float | None = None  # best valid_score_fn value, when one is given
    resumed_from_step: int = 0  # 0: started from scratch
    stopped_early: bool = False

    def summary(self) -> dict[str, Any]:
        """The numbers a tracker logs (model_dir and the valid score left out)."""
        return {
            "steps": self.steps,
            "train_time_s": self.train_time_s,
            "tokens_per_s": self.tokens_per_s,
            "best_valid_loss": self.best_valid_loss,
            "n_parameters": self.n_parameters,
            "padding_fraction": self.padding_fraction,
            "mfu": self.mfu,
            "resumed_from_step": self.resumed_from_step,
            "stopped_early": float(self.stopped_early),
            "device": self.device,
        }


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def save_weights(model: nn.Module, out_dir: Path, state: dict | None = None) -> None:
    if state is None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(Path(out_dir) / "model.pt", lambda p: torch.save(state, p))


def lr_at(step: int, cfg: TrainSettings) -> float:
    """Learning rate for 1-based `step`: linear warmup, then the chosen decay."""
    warmup = max(cfg.warmup_steps, 1)
    if step < warmup:
        return cfg.lr * step / warmup
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * math.sqrt(warmup / step)
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * ratio


def make_optimizer(model: nn.Module, cfg: TrainSettings, device: torch.device):
    # No decay on biases and LayerNorm gains (1-D); matrices and embeddings are decayed.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel (one pass over all parameters) on CUDA and on the CPU: on 2 CPU cores
    # fine-tuning GPT-2 small went from 87.6 to 110.4 tokens/s and Marian-base from 211 to
    # 239 with it (bench/hf_finetune_throughput.py --cpu, medians of 3 rounds, two runs;
    # the Hugging Face Trainer's default, adamw_torch_fused, is the same kernel).
    extra = {"fused": True} if device.type in ("cuda", "cpu") else {}
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, **extra
    )


def autocast(device: torch.device):
    # bf16 autocast on CUDA only; CPU bf16 matmuls are slower than fp32 on most CPUs.
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )


@dataclass
class Bookkeeping:
    """The loop's counters, saved in checkpoints (plain numbers and lists only)."""

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


def fit(job: FitJob) -> TrainResult:
    """Train `job`'s model; resumes from out_dir/checkpoints when they match the job."""
    run = TrainingRun(job)
    cfg = job.settings
    while run.book.step < cfg.max_steps and not run.book.stopped_early:
        run.train_step()
        if run.book.step % cfg.log_every == 0 or run.book.step == cfg.max_steps:
            run.log_training_metrics()
        if run.book.step % cfg.eval_every == 0:
            run.validate()
        if run.ckpt_every > 0 and run.book.step % run.ckpt_every == 0:
            run.checkpoint()
        if run.out_of_time():
            log.warning("stopping at step %d: max_train_minutes reached", run.book.step)
            break
    return run.finish()


class TrainingRun:
    """One invocation of `fit`: the model, optimizer, data position and bookkeeping."""

    def __init__(self, job: FitJob):
        self.job, cfg = job, job.settings
        self.t_start = time.perf_counter()
        self.out_dir = Path(job.out_dir)
        self.ctx, self.device = distributed.setup(resolve_device(cfg.device))
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(cfg.seed)
        self.raw = job.build_model().to(self.device)  # unwrapped: saved, validated, averaged
        self.raw.train()
        self.n_params = sum(p.numel() for p in self.raw.parameters())
        log.info(
            "%s: %.2fM parameters on %s",
            job.model_identity.get("type", "model"),
            self.n_params / 1e6,
            self.device,
        )
        self.flops_per_token = job.flops_per_token(self.raw) if job.flops_per_token else 0.0
        self.opt = make_optimizer(self.raw, cfg, self.device)
        # Loss scaling is for fp16, which we do not use (bf16 on CUDA, fp32 on CPU); the
        # scaler stays disabled but is checkpointed so an fp16 variant would resume right.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        self.batches = job.make_batches(self.ctx.rank, self.ctx.world)
        self.pad_fraction = getattr(self.batches, "padding_fraction", None)  # seq2seq only
        self.ckpt_dir = self.out_dir / CHECKPOINT_DIR
        self.ckpt_every = cfg.eval_every if cfg.checkpoint_every is None else cfg.checkpoint_every
        trajectory = {k: v for k, v in cfg.model_dump().items() if k not in RESUME_FREE_FIELDS}
        self.run_hash = config_hash(job.model_identity, trajectory, job.data_fingerprint)
        self.book = self._resume_or_start()
        self.resumed_from = self.book.step
        # Lazy host syncs: the loss sum of the log interval stays on the device (float64,
        # added in the same order as Python floats, so logged values are unchanged) and the
        # interval is timed by wall clock; both are read only by `flush_interval` (at log,
        # validation, checkpoint and the end), not after every step.
        self.log_loss_sum = torch.tensor(
            self.book.log_loss, dtype=torch.float64, device=self.device
        )
        self.interval_start = time.perf_counter()
        self.model = self._wrap_model()

    # --- start -----------------------------------------------------------------------------
    def _resume_or_start(self) -> Bookkeeping:
        cfg, ctx = self.job.settings, self.ctx
        ck = None
        if cfg.resume and self.ckpt_every > 0:
            ck = find_resumable(self.ckpt_dir, self.run_hash)
        if ctx.world > 1:  # all ranks must continue from rank 0's choice
            found = ck["step"] if ck is not None else -1
            if distributed.broadcast_float(found, ctx, self.device) != found:
                raise RuntimeError(
                    f"rank {ctx.rank} sees another checkpoint (step {found}) than rank 0 in "
                    f"{self.ckpt_dir}: multi-node runs need out_dir on a shared filesystem"
                )
        distributed.barrier(ctx)  # every rank has looked before rank 0 clears anything
        if ck is None:
            if ctx.is_main:
                (self.out_dir / "model.pt").unlink(missing_ok=True)  # never pair old weights
                clear_checkpoints(self.ckpt_dir)
            return Bookkeeping()
        self.raw.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.batches.load_state_dict(ck["data"])
        set_rng_state(ck["rng"])
        if ctx.is_main:
            remove_temp_files(self.ckpt_dir)
        known = {f.name for f in fields(Bookkeeping)}
        return Bookkeeping(**{k: v for k, v in ck["progress"].items() if k in known})

    def _wrap_model(self) -> nn.Module:
        model = self.ddp = self.raw
        ctx, seed = self.ctx, self.job.settings.seed
        if ctx.world > 1:
            if ctx.rank > 0:  # different dropout masks per rank (rank 0 keeps the seed's)
                torch.manual_seed(seed + 1_000_003 * ctx.rank + self.book.step)
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = self.ddp = nn.parallel.DistributedDataParallel(self.raw, device_ids=ids)
        if self.job.settings.compile:
            model = torch.compile(model)
        return model

    # --- the loop's steps --------------------------------------------------------------------
    def train_step(self) -> None:
        """One optimizer step over grad_accum_steps batches."""
        cfg, ctx, device, book = self.job.settings, self.ctx, self.device, self.book
        micro = [next(self.batches) for _ in range(cfg.grad_accum_steps)]
        n_tokens = sum(n for _, n in micro)
        if ctx.world > 1:
            n_tokens = int(distributed.all_reduce_sum([n_tokens], ctx, device)[0])
        # Sum of token losses / global token count; DDP averages over ranks, hence * world.
        denom = max(n_tokens, 1) / ctx.world
        book.step += 1
        self.lr = lr_at(book.step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        self.opt.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for i, (batch, n) in enumerate(micro):
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            last = i == len(micro) - 1
            with nullcontext() if ctx.world == 1 or last else self.ddp.no_sync():
                with autocast(device):
                    loss_sum, _ = self.job.loss_fn(self.model, batch, True)
                    loss = loss_sum / denom if n > 0 else loss_sum * 0.0
                self.scaler.scale(loss).backward()
            step_loss += loss.detach().float()
        self.scaler.unscale_(self.opt)
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.clip_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.log_loss_sum += step_loss.double()  # no host sync here (see __init__)
        book.train_tokens += n_tokens  # token counts come from the host-side batcher
        book.log_tokens += n_tokens
        book.log_steps += 1
        self._report_progress(step_loss)

    def flush_interval(self) -> None:
        """Wait for the device, then move the interval's time and loss sum into `book`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the interval's time covers its kernels
        now = time.perf_counter()
        dt = now - self.interval_start
        self.book.train_s += dt
        self.book.log_s += dt
        self.book.log_loss = float(self.log_loss_sum)
        self.interval_start = now

    def restart_interval_clock(self) -> None:
        # Validation and checkpoints are not training time.
        self.interval_start = time.perf_counter()

    def _report_progress(self, step_loss: torch.Tensor) -> None:
        if not (self.ctx.is_main and self.job.on_progress):
            return
        book = self.book
        # A progress display reads the loss every step: the one per-step sync left, and only
        # when a display asks for it. Its tokens/s is the interval's wall-clock rate so far.
        seconds = book.log_s + time.perf_counter() - self.interval_start
        self.job.on_progress(
            Progress(
                step=book.step,
                max_steps=self.job.settings.max_steps,
                loss=float(step_loss),  # rank 0's estimate of the mean (its slice, x world)
                tokens_per_s=book.log_tokens / max(seconds, 1e-9),
                elapsed_s=time.perf_counter() - self.t_start,
                resumed_from_step=self.resumed_from,
            )
        )

    def log_training_metrics(self) -> None:
        self.flush_interval()
        ctx, book = self.ctx, self.book
        loss = distributed.all_reduce_sum([book.log_loss], ctx, self.device)[0] / ctx.world
        tokens_per_s = book.log_tokens / max(book.log_s, 1e-9)
        metrics = {
            "train_loss": loss / book.log_steps,
            "lr": self.lr,
            "tokens_per_s": tokens_per_s,
            "grad_norm": float(self.grad_norm),
        }
        if self.flops_per_token:
            metrics["mfu"] = self.mfu(tokens_per_s)
        if self.pad_fraction:
            metrics["padding_fraction"] = self.pad_fraction()
        if ctx.is_main:
            log.info("step %d: %s", book.step, {k: round(v, 5) for k, v in metrics.items()})
            if self.job.on_metrics:
                self.job.on_metrics(metrics, book.step)
        book.log_loss, book.log_tokens, book.log_steps, book.log_s = 0.0, 0, 0, 0.0
        self.log_loss_sum.zero_()

    def validate(self) -> None:
        """Validation loss (and score), best-weights selection, early stopping."""
        self.flush_interval()
        try:
            self._validate()
        finally:
            self.restart_interval_clock()

    def _validate(self) -> None:
        book, ctx, job = self.book, self.ctx, self.job
        book.last_eval = book.step
        if not job.valid_batches and job.valid_score_fn is None:
            return
        metrics: dict[str, float] = {}
        loss = math.nan
        if job.valid_batches:  # each rank scores its share, then the sums are combined
            total, n = self._valid_loss_sum(job.valid_batches[ctx.rank :: ctx.world])
            total, n = distributed.all_reduce_sum([total, n], ctx, self.device)
            loss = total / max(n, 1)
            metrics = {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0))}
            book.best_loss = min(book.best_loss, loss)
        score = self._valid_score() if job.valid_score_fn is not None else None
        if score is not None:
            metrics["valid_score"] = score
        log.info("step %d: %s", book.step, {k: round(v, 4) for k, v in metrics.items()})
        if ctx.is_main and job.on_metrics:
            job.on_metrics(metrics, book.step)
        metric = score if score is not None else -loss
        book.valid_metrics.append([book.step, metric])
        if metric > book.best_metric:  # False for NaN: a diverged model is never kept
            book.best_metric, book.best_score, book.bad_evals, book.saved = metric, score, 0, True
            if ctx.is_main:
                save_weights(self.raw, self.out_dir)
            return
        book.bad_evals += 1
        patience = job.settings.early_stop_patience
        if patience and book.bad_evals >= patience:
            book.stopped_early = True
            log.info("early stop at step %d: %d validations without gain", book.step, patience)

    def _valid_loss_sum(self, batches: list[Batch]) -> tuple[float, int]:
        self.raw.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        n = torch.zeros((), dtype=torch.int64, device=self.device)
        with torch.no_grad(), autocast(self.device):
            for batch in batches:
                loss, k = self.job.loss_fn(self.raw, tuple(t.to(self.device) for t in batch), False)
                total += loss.double()  # float64 sums in batch order, as Python floats did
                n += k
        self.raw.train()
        return float(total), int(n)

    def _valid_score(self) -> float:
        score = 0.0
        if self.ctx.is_main:  # e.g. BLEU by decoding: rank 0 scores, the others get its number
            self.raw.eval()
            with torch.no_grad():
                score = float(self.job.valid_score_fn(self.raw))
            self.raw.train()
        return distributed.broadcast_float(score, self.ctx, self.device)

    def checkpoint(self) -> None:
        self.flush_interval()  # the saved bookkeeping holds the interval's loss sum
        try:
            self._save_checkpoint()
        finally:
            self.restart_interval_clock()

    def _save_checkpoint(self) -> None:
        book, cfg = self.book, self.job.settings
        book.last_ckpt = book.step
        if not self.ctx.is_main:
            return
        state = {
            "config_hash": self.run_hash,
            "model_identity": self.job.model_identity,
            "train_config": cfg.model_dump(mode="json"),
            "world_size": self.ctx.world,
            "step": book.step,
            "schedule": {"step": book.step, "lr": lr_at(max(book.step, 1), cfg)},
            "model": {k: v.detach().cpu() for k, v in self.raw.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "data": self.batches.state_dict(),
            "progress": asdict(book),
        }
        save_checkpoint(self.ckpt_dir, book.step, state)
        keep_last = max(cfg.keep_last, cfg.average_last_n, 1)  # resume needs the newest
        prune_checkpoints(
            self.ckpt_dir, keep_last, cfg.keep_best, dict(map(tuple, book.valid_metrics))
        )

    def out_of_time(self) -> bool:
        limit = self.job.settings.max_train_minutes
        if limit is None:
            return False
        over = (time.perf_counter() - self.t_start) / 60 >= limit
        return bool(distributed.broadcast_float(float(over), self.ctx, self.device))

    def mfu(self, tokens_per_s: float) -> float:
        if not self.flops_per_token:
            return 0.0
        return tokens_per_s * self.flops_per_token / (self.ctx.world * peak_flops(self.device))

    # --- end -------------------------------------------------------------------------------
    def finish(self) -> TrainResult:
        """Last validation and checkpoint, final weights, averaging; the run's summary."""
        book, cfg, main = self.book, self.job.settings, self.ctx.is_main
        self.flush_interval()
        if book.last_eval != book.step:
            self.validate()
        if self.ckpt_every > 0 and book.last_ckpt != book.step:
            self.checkpoint()
        if main and not book.saved:  # no validation data (or a non-finite loss): final weights
            save_weights(self.raw, self.out_dir)
        if main and cfg.average_last_n > 1:
            paths = [path for _, path in list_checkpoints(self.ckpt_dir)[-cfg.average_last_n :]]
            if len(paths) < cfg.average_last_n:
                log.warning("averaging %d checkpoints, not %d", len(paths), cfg.average_last_n)
            if paths:
                save_weights(self.raw, self.out_dir, average_checkpoints(paths))
        distributed.barrier(self.ctx)  # model.pt is complete before any rank returns
        tokens_per_s = book.train_tokens / max(book.train_s, 1e-9)
        return TrainResult(
            model_dir=self.out_dir,
            steps=book.step,
            train_time_s=time.perf_counter() - self.t_start,
            tokens_per_s=tokens_per_s,
            best_valid_loss=book.best_loss,
            n_parameters=self.n_params,
            device=str(self.device),
            padding_fraction=self.pad_fraction() if self.pad_fraction else 0.0,
            mfu=self.mfu(tokens_per_s) if book.train_s > 0 else 0.0,
            best_valid_score=book.best_score,
            resumed_from_step=self.resumed_from,
            stopped_early=book.stopped_early,
        )


def find_resumable(ckpt_dir: Path, run_hash: str) -> dict[str, Any] | None:
    """The newest readable checkpoint of this run (same config and data), if any."""
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
