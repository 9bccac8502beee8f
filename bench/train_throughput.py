"""Training throughput: seqmodels' trainer against a plain PyTorch loop and Hugging Face.

    python bench/train_throughput.py [--device auto|cuda|cpu] [--warmup N] [--steps N]
        [--quick | --full | --smoke] [--models seq2seq,lm,lstm] [--rounds N] [--no-hf]
        [--compile]

Three models, each trained for warmup + timed optimizer steps on the same batches by
  - seqmodels: its real training entry points (seqmodels.training.recipes:
    train_seq2seq_model / train_language_model -> trainer.fit) on the model its registered
    family builds, with validation and checkpoints switched off.
    Time is taken between the trainer's per-step metric callbacks, so batching, collation,
    host-to-device copies, the step and the trainer's bookkeeping all count;
  - plain: the same model class in a bare loop (forward, loss, backward, clipping, AdamW;
    no per-step host sync): the ceiling for seqmodels' machinery;
  - hf: the Hugging Face equivalent built from a config object (random weights, nothing
    downloaded) in that same bare loop: MarianMT for (a), GPT-2 for (b); none for (c).

(a) Transformer-base encoder-decoder: 6+6 layers, d_model 512, FFN 2048, 8 heads, 16k joint
    SentencePiece vocabulary trained on Multi30k de-en train, whose tokenised pairs are the
    training data, in token batches (batch_tokens = sentences x longest side, as seqmodels
    and fairseq's --max-tokens count them);
(b) decoder-only LM, 12 layers, d_model 768, 12 heads (GPT-2 small shape, vocab 50304) at
    context 1024, on a random id stream (a Transformer's cost does not depend on the ids);
(c) LSTM LM, 2 layers of 1024 units, 16k vocab, windows of 128 tokens.

tokens/s counts predicted (non-pad target) tokens. MFU = tokens/s x training FLOPs per token
(the seqmodels model's flops_per_token, see seqmodels.training.flops; one figure for all
implementations of a model) / the measured peak of the device
(seqmodels.training.flops.peak_flops: bf16 matmul on CUDA, fp32 on CPU). On CPU the batches
are reduced (--quick) unless --full is given, and the best single step of each
implementation is reported too: other processes on a shared host only ever slow a step
down. --rounds N times every implementation N times in alternating order and keeps the best.
The Multi30k files come from the mirror (SEQMODELS_MIRROR, default ../shared/corpora).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from corpora import multi30k  # noqa: E402

from seqmodels import BOS_ID, EOS_ID, PAD_ID  # noqa: E402
from seqmodels.models import FAMILIES  # noqa: E402
from seqmodels.models.recurrent_lm import RecurrentLMArchitecture  # noqa: E402
from seqmodels.models.transformer_lm import TransformerLMArchitecture  # noqa: E402
from seqmodels.models.transformer_seq2seq import TransformerSeq2SeqArchitecture  # noqa: E402
from seqmodels.training.batching import (  # noqa: E402
    IGNORE_TARGET,
    LMBatches,
    PairBatches,
    prepare_pairs,
)
from seqmodels.training.flops import peak_flops  # noqa: E402
from seqmodels.training.recipes import train_language_model, train_seq2seq_model  # noqa: E402
from seqmodels.training.settings import LMTrainSettings, Seq2SeqTrainSettings  # noqa: E402
from seqmodels.training.trainer import resolve_device  # noqa: E402

WORKDIR = Path(tempfile.gettempdir()) / "seqmodels-bench"
LABEL_SMOOTHING = Seq2SeqTrainSettings().label_smoothing  # seq2seq, as the trainer's default
# The registered model type (seqmodels.models.FAMILIES) of each benchmark model.
MODEL_TYPES = {"seq2seq": "transformer_seq2seq", "lm": "transformer_lm", "lstm": "lstm_lm"}

# Model and batch sizes. "quick" keeps the models and shrinks the batches so a slow CPU
# finishes in minutes; "smoke" is tiny everything, only to check that the script runs.
SIZES = {
    "full": {
        "seq2seq": {"vocab": 16000, "d": 512, "heads": 8, "layers": 6, "ff": 2048, "tokens": 16384},
        "lm": {"vocab": 50304, "d": 768, "heads": 12, "layers": 12, "block": 1024, "batch": 16},
        "lstm": {"vocab": 16000, "hidden": 1024, "layers": 2, "block": 128, "tokens": 16384},
        "warmup": 5,
        "steps": 20,
    },
    "quick": {
        "seq2seq": {"vocab": 16000, "d": 512, "heads": 8, "layers": 6, "ff": 2048, "tokens": 2048},
        "lm": {"vocab": 50304, "d": 768, "heads": 12, "layers": 12, "block": 1024, "batch": 1},
        "lstm": {"vocab": 16000, "hidden": 1024, "layers": 2, "block": 128, "tokens": 2048},
        "warmup": 1,
        "steps": 3,
    },
    "smoke": {
        "seq2seq": {
            "vocab": 256,
            "d": 32,
            "heads": 2,
            "layers": 1,
            "ff": 64,
            "tokens": 256,
            "spm_lines": 1000,
        },  # a small vocabulary trains fast on a slice
        "lm": {"vocab": 256, "d": 32, "heads": 2, "layers": 1, "block": 64, "batch": 2},
        "lstm": {"vocab": 256, "hidden": 32, "layers": 1, "block": 32, "tokens": 128},
        "warmup": 1,
        "steps": 1,
    },
}


# --- data -------------------------------------------------------------------------------


def seq2seq_architecture(size: dict) -> TransformerSeq2SeqArchitecture:
    """The Transformer enc-dec of a SIZES entry (d, heads, layers, ff), as every bench builds it."""
    return TransformerSeq2SeqArchitecture(
        d_model=size["d"],
        n_head=size["heads"],
        n_enc_layers=size["layers"],
        n_dec_layers=size["layers"],
        d_ff=size["ff"],
        dropout=0.1,
        max_positions=256,
    )


def sentencepiece_model(
    data: dict[str, list[str]], vocab_size: int, workdir: Path, lines: int | None = None
) -> Path:
    """A joint de+en unigram model trained on Multi30k train (its first `lines` pairs if
    given), cached in workdir."""
    import sentencepiece as spm

    path = workdir / f"multi30k-unigram-{vocab_size}-{lines or 'all'}.model"
    if path.exists():
        return path
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = workdir / f"tmp-{os.getpid()}"
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(data["train.de"][:lines] + data["train.en"][:lines]),
        model_prefix=str(prefix),
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        unk_id=1,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    os.replace(f"{prefix}.model", path)  # atomic: concurrent runs never see a partial file
    Path(f"{prefix}.vocab").unlink(missing_ok=True)
    return path


def encode(
    data: dict[str, list[str]], split: str, spm_path: Path
) -> tuple[list[list[int]], list[list[int]], int]:
    """(source ids, target ids, vocabulary size) of a Multi30k split."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    return sp.encode(data[f"{split}.de"]), sp.encode(data[f"{split}.en"]), sp.get_piece_size()


# --- timing -----------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    # As the trainer: bf16 autocast on CUDA, fp32 on CPU.
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarise(seconds: list[float], tokens: list[int], device) -> dict:
    """tokens/s over the timed steps, and on CPU (a shared host where other processes only
    ever slow a step down) also the best single step, the figure least hit by them."""
    out = {"tokens_per_s": sum(tokens) / sum(seconds), "best_step_tokens_per_s": None}
    if device.type == "cpu":
        out["best_step_tokens_per_s"] = max(n / s for n, s in zip(tokens, seconds, strict=True))
    return out


def time_seqmodels(train, warmup: int, steps: int, tokens: list[int], device) -> dict:
    """Run seqmodels' trainer for warmup + steps steps; `train(settings, on_metrics,
    out_dir)` calls train_*_model. Time is taken between the trainer's metric callbacks, so
    it covers everything the training loop does. The trainer waits for the device only at
    its log intervals: on CPU it logs every step (for the best single step), on CUDA every
    gcd(warmup, steps) steps, so the timed span still starts right after the warmup."""
    stamps: dict[int, float] = {}
    reported: dict[int, float] = {}
    mfus: list[float] = []

    def on_metrics(metrics: dict, step: int) -> None:
        if "tokens_per_s" in metrics:  # a training log line (validation is off anyway)
            stamps[step] = time.perf_counter()
            reported[step] = metrics["tokens_per_s"]
            mfus.append(metrics.get("mfu", 0.0))

    every = 1 if device.type == "cpu" else math.gcd(warmup, steps)
    settings = {
        "max_steps": warmup + steps,
        "log_every": every,
        "eval_every": 10**9,
        "checkpoint_every": 0,
        "resume": False,
    }
    with tempfile.TemporaryDirectory(prefix="seqmodels-bench-") as tmp:
        result = train(settings, on_metrics, Path(tmp))
    ends = list(range(warmup, warmup + steps + 1, every))  # interval ends, warmup's included
    assert all(step in stamps for step in ends), (sorted(stamps), ends)
    seconds = [stamps[b] - stamps[a] for a, b in zip(ends, ends[1:], strict=False)]
    counts = [sum(tokens[a:b]) for a, b in zip(ends, ends[1:], strict=False)]
    out = summarise(seconds, counts, device)
    # The trainer's own figures: its tokens/s per interval combined over the timed steps,
    # and the MFU it reports for that rate.
    rates = [reported[b] for b in ends[1:]]
    own = sum(counts) / sum(n / r for n, r in zip(counts, rates, strict=True))
    out["trainer_reported_tokens_per_s"] = own
    out["trainer_reported_mfu"] = own * mfus[-1] / rates[-1]
    out["padding_fraction"] = result.padding_fraction
    return out


def time_loop(
    model, forward, batches, *, warmup: int, device, smoothing: float, compile_model: bool
) -> dict:
    """A bare training loop on `batches` [(tensors, n)]; summarise() of its timed steps.
    No per-step sync: on CUDA only the total time is exact (best_step is CPU-only)."""
    model.to(device).train()
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01, **fused
    )
    run = torch.compile(model) if compile_model else model

    def step(batch, n: int) -> None:
        batch = [t.to(device, non_blocking=True) for t in batch]
        with autocast(device):
            logits, target = forward(run, batch)
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(),
                target.flatten(),
                ignore_index=IGNORE_TARGET,  # batching pads targets with it
                label_smoothing=smoothing,
                reduction="sum",
            )
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for batch, n in batches[:warmup]:
        step(batch, n)
    sync(device)
    stamps = [time.perf_counter()]
    for batch, n in batches[warmup:]:
        step(batch, n)
        stamps.append(time.perf_counter())
    sync(device)
    stamps[-1] = time.perf_counter()
    return summarise(np.diff(stamps).tolist(), [n for _, n in batches[warmup:]], device)


# --- the three models -------------------------------------------------------------------


def s2s_forward(model, b):
    return model(b[0], b[1], b[2]), b[3]


def hf_s2s_forward(model, b):
    return model(input_ids=b[0], attention_mask=b[1], decoder_input_ids=b[2]).logits, b[3]


def lm_forward(model, b):
    return model(b[0])[0], b[1]


def hf_lm_forward(model, b):
    return model(input_ids=b[0]).logits, b[1]


def marian(c: TransformerSeq2SeqArchitecture, vocab_size: int, use_cache: bool):
    """MarianMT with seqmodels' sizes: shared embeddings tied to the output, scaled
    embeddings, sinusoidal positions, GELU, no activation dropout (as seqmodels)."""
    from transformers import MarianConfig, MarianMTModel

    config = MarianConfig(
        vocab_size=vocab_size,
        decoder_vocab_size=vocab_size,
        d_model=c.d_model,
        encoder_layers=c.n_enc_layers,
        decoder_layers=c.n_dec_layers,
        encoder_attention_heads=c.n_head,
        decoder_attention_heads=c.n_head,
        encoder_ffn_dim=c.d_ff,
        decoder_ffn_dim=c.d_ff,
        max_position_embeddings=c.max_positions,
        dropout=c.dropout,
        attention_dropout=c.dropout,
        activation_dropout=0.0,
        activation_function="gelu",
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        decoder_start_token_id=BOS_ID,
        forced_eos_token_id=None,
        use_cache=use_cache,
    )
    return MarianMTModel(config)


def gpt2(c: TransformerLMArchitecture, vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=c.block_size,
        n_embd=c.d_model,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=c.d_ff,
        activation_function="gelu",  # seqmodels' exact GELU (GPT-2's tanh one is gelu_new)
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        use_cache=False,
    )
    return GPT2LMHeadModel(config)


def trainer_entry(
    train_fn: Callable, base: Any, *, make_model, data: tuple, **model_kw
) -> Callable:
    """`train(settings, on_metrics, out_dir)` for time_seqmodels: the trainer's entry point
    (train_seq2seq_model or train_language_model) on `data` (train, valid) with `base`, the
    bench's training settings, updated with the timing's own `settings`."""

    def train(settings: dict, on_metrics, out_dir: Path):
        cfg = base.model_validate(base.model_dump() | settings)
        return train_fn(make_model, *data, cfg, out_dir, on_metrics=on_metrics, **model_kw)

    return train


@dataclass
class Workload:
    """One model shape set up for every contender: the model as its registered family builds
    it (and its identity as the trainer keys it), the trainer's own batches, and how each
    loop runs it."""

    identity: dict
    make_plain: Callable[[], torch.nn.Module]
    batches: list  # [(tensors, target tokens)], warmup + timed steps
    train: Callable  # (settings, on_metrics, out_dir) -> the trainer's result
    plain_forward: Callable
    smoothing: float
    make_hf: Callable[[], torch.nn.Module] | None
    hf_forward: Callable | None
    flops: Callable[[torch.nn.Module], float]  # training FLOPs per target token
    shape: str


def seq2seq_workload(size: dict, args, device, data, spm_path: Path | None) -> Workload:
    """The Transformer seq2seq on Multi30k pairs; `spm_path`: a ready SentencePiece model
    (else one is trained)."""
    model_type = MODEL_TYPES["seq2seq"]
    family = FAMILIES[model_type]
    spm_path = spm_path or sentencepiece_model(data, size["vocab"], WORKDIR, size.get("spm_lines"))
    srcs_raw, tgts_raw, vocab = encode(data, "train", spm_path)
    arch = seq2seq_architecture(size)
    identity = {
        "type": "transformer_seq2seq",
        "architecture": arch.model_dump(),
        "vocab_size": vocab,
    }
    pairs = [(np.array(s), np.array(t)) for s, t in zip(srcs_raw, tgts_raw, strict=True)]
    cfg = {"batch_tokens": size["tokens"], "max_seq_len": arch.max_positions}
    # The trainer's own data path, replayed with its seed: the very batches it will see.
    srcs, tgts = prepare_pairs(pairs, arch.max_positions, truncate=False)
    it = PairBatches(srcs, tgts, size["tokens"], seed=0)
    src_len = float(np.mean([len(s) for s in srcs]))
    tgt_len = float(np.mean([len(t) - 1 for t in tgts]))

    def make_plain():
        return family.build(arch, vocab)

    train = trainer_entry(
        train_seq2seq_model,
        Seq2SeqTrainSettings(**cfg, device=str(device), compile=args.compile),
        make_model=make_plain,
        data=(pairs, []),
        model_identity=identity,
        max_positions=family.max_positions(arch),
    )
    return Workload(
        identity=identity,
        make_plain=make_plain,
        batches=[next(it) for _ in range(args.warmup + args.steps)],
        train=train,
        plain_forward=s2s_forward,
        smoothing=LABEL_SMOOTHING,
        make_hf=lambda: marian(arch, vocab, use_cache=False),
        hf_forward=hf_s2s_forward,
        flops=lambda m: m.flops_per_token(src_len, tgt_len),
        shape=f"{size['tokens']} batch tokens (sentences x longest side)",
    )


def lm_workload(name: str, size: dict, args, device) -> Workload:
    """The Transformer LM (`lm`, against GPT-2) or the LSTM LM (`lstm`, no Hugging Face
    counterpart) on a random token stream."""
    block, vocab = size["block"], size["vocab"]
    if name == "lm":
        arch = TransformerLMArchitecture(
            block_size=block,
            n_layer=size["layers"],
            n_head=size["heads"],
            d_model=size["d"],
            d_ff=4 * size["d"],
            dropout=0.1,
        )
        batch_size = size["batch"]
    else:
        arch = RecurrentLMArchitecture(
            emb_dim=size["hidden"], hidden_size=size["hidden"], n_layers=size["layers"], dropout=0.2
        )
        batch_size = size["tokens"] // block
    model_type = MODEL_TYPES[name]
    family = FAMILIES[model_type]
    identity = {"type": model_type, "architecture": arch.model_dump(), "vocab_size": vocab}
    rng = np.random.default_rng(0)
    stream = rng.integers(4, vocab, size=max(200_000, 4 * block * batch_size))
    cfg = {"batch_tokens": block * batch_size, "block_size": block}
    it = LMBatches(stream, block, batch_size, seed=0)  # the trainer's batches, as above

    def make_plain():
        return family.build(arch, vocab)

    train = trainer_entry(
        train_language_model,
        LMTrainSettings(**cfg, device=str(device), compile=args.compile),
        make_model=make_plain,
        data=(stream, np.zeros(0, np.int64)),
        model_identity=identity,
        max_context=family.max_context(arch),
    )
    return Workload(
        identity=identity,
        make_plain=make_plain,
        batches=[next(it) for _ in range(args.warmup + args.steps)],
        train=train,
        plain_forward=lm_forward,
        smoothing=0.0,
        make_hf=(lambda: gpt2(arch, vocab)) if name == "lm" else None,
        hf_forward=hf_lm_forward if name == "lm" else None,
        flops=lambda m: m.flops_per_token(block),
        shape=f"{batch_size} x {block} tokens",
    )


def alternate_rounds(run: Callable[[str], dict], impls: list[str], rounds: int) -> dict:
    """Time each contender `rounds` times, alternating their order; keep each one's best
    overall rate and best single step."""
    timings: dict[str, dict] = {}
    for r in range(rounds):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            t = run(impl)
            if impl in timings:
                best = timings[impl]
                if best["best_step_tokens_per_s"] is not None:
                    t["best_step_tokens_per_s"] = max(
                        t["best_step_tokens_per_s"], best["best_step_tokens_per_s"]
                    )
                if best["tokens_per_s"] > t["tokens_per_s"]:
                    t = {**best, "best_step_tokens_per_s": t["best_step_tokens_per_s"]}
            timings[impl] = t
    return timings


def add_ratios(out: dict, timings: dict, flops_per_token: float, peak: float) -> None:
    """Each contender's rate and MFU into `out`, the trainer's own figures, and seqmodels'
    ratios to the plain loop and to Hugging Face (overall and best step)."""
    for impl in ("seqmodels", "plain", "hf"):
        t = timings.get(impl, {})
        out[f"{impl}_tokens_per_s"] = t.get("tokens_per_s")
        out[f"{impl}_best_step_tokens_per_s"] = t.get("best_step_tokens_per_s")
        out[f"{impl}_mfu"] = t["tokens_per_s"] * flops_per_token / peak if t else None
    for key, value in timings["seqmodels"].items():  # the trainer's own figures
        out.setdefault(f"seqmodels_{key}", value)
    for ref in ("plain", "hf"):
        for suffix, key in (("", "tokens_per_s"), ("_best_step", "best_step_tokens_per_s")):
            a, b = out[f"seqmodels_{key}"], out[f"{ref}_{key}"]
            out[f"seqmodels_vs_{ref}{suffix}"] = a / b if a and b else None


def print_figures(out: dict, impls: list[str]) -> None:
    for impl in impls:
        line = f"  {impl:9s} {out[f'{impl}_tokens_per_s']:10,.1f} tokens/s"
        line += f"   MFU {out[f'{impl}_mfu']:6.1%}"
        if out[f"{impl}_best_step_tokens_per_s"]:
            line += f"   best step {out[f'{impl}_best_step_tokens_per_s']:10,.1f} tokens/s"
        print(line)
    for ref in ("plain", "hf"):
        if out[f"seqmodels_vs_{ref}"]:
            line = f"  seqmodels / {ref:5s} {out[f'seqmodels_vs_{ref}']:.3f}"
            if out[f"seqmodels_vs_{ref}_best_step"]:
                line += f"   best step {out[f'seqmodels_vs_{ref}_best_step']:.3f}"
            print(line)


def bench_model(name: str, size: dict, args, device, data, *, spm_path: Path | None = None) -> dict:
    """Time seqmodels, the plain loop and (where there is one) Hugging Face on one model.
    `spm_path`: a ready SentencePiece model for the seq2seq shape (else one is trained)."""
    if name == "seq2seq":
        work = seq2seq_workload(size, args, device, data, spm_path)
    else:
        work = lm_workload(name, size, args, device)
    W, N = args.warmup, args.steps
    tokens = [n for _, n in work.batches]
    torch.manual_seed(0)
    model = work.make_plain()
    flops_per_token = work.flops(model)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    out = {
        "config": work.identity,
        "params_m": round(n_params / 1e6, 2),
        "batch": work.shape,
        "target_tokens_per_step": round(sum(tokens[W:]) / N),
        "train_flops_per_token": flops_per_token,
    }
    tps = out["target_tokens_per_step"]
    print(f"[{name}] {n_params / 1e6:.1f}M parameters, {work.shape}, {tps} target tokens per step")

    def run(impl: str) -> dict:
        free_memory()
        if impl == "seqmodels":
            return time_seqmodels(work.train, W, N, tokens, device)
        torch.manual_seed(0)
        model = work.make_plain() if impl == "plain" else work.make_hf()
        if impl == "hf":
            out["hf_params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        forward = work.plain_forward if impl == "plain" else work.hf_forward
        return time_loop(
            model,
            forward,
            work.batches,
            warmup=W,
            device=device,
            smoothing=work.smoothing,
            compile_model=args.compile,
        )

    impls = ["seqmodels", "plain"] + (["hf"] if work.make_hf is not None and args.hf else [])
    timings = alternate_rounds(run, impls, args.rounds)
    free_memory()
    add_ratios(out, timings, flops_per_token, peak_flops(device))
    print_figures(out, list(timings))
    return out


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def hf_available() -> str | None:
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        return transformers.__version__
    except ImportError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    parser.add_argument("--warmup", type=int, help="untimed steps (default by sizes)")
    parser.add_argument("--steps", type=int, help="timed steps (default by sizes)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="reduced batches (default on CPU)")
    mode.add_argument("--full", action="store_true", help="full batches (default on CUDA)")
    mode.add_argument("--smoke", action="store_true", help="tiny models, 1+1 steps: a check")
    parser.add_argument("--models", default="seq2seq,lm,lstm")
    parser.add_argument(
        "--rounds", type=int, default=1, help="time each implementation this often, keep the best"
    )
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip Hugging Face")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    args = parser.parse_args()

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer
        torch.backends.cudnn.allow_tf32 = True
    sizes = "smoke" if args.smoke else "full" if args.full else "quick" if args.quick else None
    sizes = sizes or ("full" if device.type == "cuda" else "quick")
    args.warmup = max(1, args.warmup if args.warmup is not None else SIZES[sizes]["warmup"])
    args.steps = max(1, args.steps if args.steps is not None else SIZES[sizes]["steps"])
    hf_version = hf_available() if args.hf else None
    args.hf = hf_version is not None
    print(
        f"device {describe_device(device)}; sizes {sizes}; {args.warmup} warmup + {args.steps} "
        f"timed steps; Hugging Face {hf_version or 'not compared'}"
    )
    data = multi30k(WORKDIR / "cache")
    peak = peak_flops(device)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    print(f"measured peak {peak / 1e12:.3f} TFLOP/s ({dtype} matmul)")

    results = {}
    for name in args.models.split(","):
        results[name] = bench_model(name, SIZES[sizes][name], args, device, data)
    reduced = sizes != "full"
    figures = {
        "bench": "train_throughput",
        "device": describe_device(device),
        "date": time.strftime("%Y-%m-%d"),
        "sizes": sizes,
        "reduced": reduced,
        "note": "batches reduced from the full sizes" if reduced else "full sizes",
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "rounds": args.rounds,
        "compile": args.compile,
        "peak_tflops": peak / 1e12,
        "peak_dtype": dtype,
        "torch": torch.__version__,
        "transformers": hf_version,
        "models": results,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
