"""Fine-tuning throughput: seqmodels' trainer against the Hugging Face `Trainer`.

    python bench/hf_finetune_throughput.py [--device auto|cuda|cpu] [--cpu | --full | --smoke]
        [--warmup N] [--steps N] [--rounds N] [--models gpt2,marian] [--hf-optim NAME]

Two Hugging Face models with random weights (built from config objects, nothing downloaded):
  - gpt2: GPT2LMHeadModel with GPT-2 small's shape (12 layers, d 768, 12 heads, vocab 50257,
    1024 positions);
  - marian: MarianMTModel with opus-mt's Marian-base shape (6+6 layers, d 512, 8 heads, FFN
    2048, swish, vocab 58101, shared and tied embeddings);
each fine-tuned for warmup + timed optimizer steps on the same batches by
  - seqmodels: `seqmodels.training.trainer.fit(FitJob(...))`, the loop every seqmodels model
    trains in. GPT-2 runs behind seqmodels.models.hf_causal_lm.HFCausalLM with
    recipes.lm_loss (what the hf_causal_lm family trains); Marian behind a small local
    wrapper, `model(src, src_mask, tgt_in) -> logits`, with recipes.seq2seq_loss;
  - hf: `transformers.Trainer` with the model's own loss (labels), its default optimizer
    implementation unless --hf-optim says otherwise.
The batches are made once per process from a fixed seed (the digest of their tensors is
checked to be the same for both), then handed over as they are: to seqmodels by make_batches,
to the Trainer by an IterableDataset of whole batches (batch size 1, a collator that unwraps
it, so no sampler, shuffling or re-collation). Both: AdamW (betas 0.9/0.98, eps 1e-8, weight
decay 0.01 on matrices/embeddings), the same peak lr, linear warmup then cosine decay, clipping
at 1.0, no label smoothing, no evaluation, no checkpoints, no logging; fp32 on CPU, bf16
autocast on CUDA (`bf16=True` for the Trainer). The KV cache is off (use_cache=False) in both.

Timed: from the end of warmup step W to the end of step W + N (per-step callbacks of each
trainer; on CUDA with a synchronize at those two points only), so batching, the host-to-device
copy, forward, backward, clipping, the optimizer and each trainer's bookkeeping all count;
building the model and the first W steps do not. tokens/s = predicted target tokens / time.

Both contenders use torch's thread pool, so each measurement runs in its own subprocess, and
the order alternates by round (seqmodels first in even rounds, hf first in odd ones). The
figures are the median, min and max over rounds per contender, the ratio of the medians
seqmodels / hf, and the median of the per-round ratios. The last line printed is one JSON
object.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_throughput import describe_device, hf_available  # noqa: E402

from seqmodels import BOS_ID, EOS_ID, PAD_ID  # noqa: E402
from seqmodels.models.hf_causal_lm import HFCausalLM  # noqa: E402
from seqmodels.training.batching import IGNORE_TARGET, Batch, collate  # noqa: E402
from seqmodels.training.recipes import lm_loss, seq2seq_loss  # noqa: E402
from seqmodels.training.settings import TrainSettings  # noqa: E402
from seqmodels.training.trainer import FitJob, fit, make_optimizer, resolve_device  # noqa: E402

CONTENDERS = ("seqmodels", "hf")
LR, WARMUP_LR_STEPS, SEED = 5e-5, 2, 0
# Model shapes and batches. "full": the real models at GPU batch sizes; "cpu": the real models
# with batches small enough that a step takes seconds on a 2-core CPU; "smoke": tiny, a check.
# gpt2: batch x block tokens; marian: `batch` sentence pairs, lengths uniform in [lo, hi].
SIZES = {
    "full": {
        "gpt2": {"vocab": 50257, "d": 768, "layers": 12, "heads": 12, "batch": 8, "block": 1024},
        "marian": {"vocab": 58101, "d": 512, "layers": 6, "heads": 8, "ff": 2048, "batch": 128,
                   "lo": 10, "hi": 60},
        "warmup": 5, "steps": 30, "rounds": 5,
    },
    "cpu": {
        "gpt2": {"vocab": 50257, "d": 768, "layers": 12, "heads": 12, "batch": 2, "block": 128},
        "marian": {"vocab": 58101, "d": 512, "layers": 6, "heads": 8, "ff": 2048, "batch": 16,
                   "lo": 8, "hi": 32},
        "warmup": 2, "steps": 5, "rounds": 3,
    },
    "smoke": {
        "gpt2": {"vocab": 512, "d": 32, "layers": 1, "heads": 2, "batch": 2, "block": 16},
        "marian": {"vocab": 512, "d": 32, "layers": 1, "heads": 2, "ff": 64, "batch": 4,
                   "lo": 3, "hi": 8},
        "warmup": 1, "steps": 1, "rounds": 1,
    },
}  # fmt: skip


# --- models ------------------------------------------------------------------------------


def build_hf_model(name: str, size: dict) -> nn.Module:
    """The Hugging Face model with random weights (seeded: the same for both contenders)."""
    import transformers

    if name == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=size["vocab"],
            n_positions=max(1024, size["block"]),
            n_embd=size["d"],
            n_layer=size["layers"],
            n_head=size["heads"],
            use_cache=False,
        )
        model_class = transformers.GPT2LMHeadModel
    else:
        # opus-mt-*'s MarianConfig (Marian base), with seqmodels' special ids.
        config = transformers.MarianConfig(
            vocab_size=size["vocab"],
            decoder_vocab_size=size["vocab"],
            d_model=size["d"],
            encoder_layers=size["layers"],
            decoder_layers=size["layers"],
            encoder_attention_heads=size["heads"],
            decoder_attention_heads=size["heads"],
            encoder_ffn_dim=size["ff"],
            decoder_ffn_dim=size["ff"],
            max_position_embeddings=512,
            activation_function="swish",
            dropout=0.1,
            attention_dropout=0.0,
            activation_dropout=0.0,
            scale_embedding=True,
            share_encoder_decoder_embeddings=True,
            tie_word_embeddings=True,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            bos_token_id=BOS_ID,
            decoder_start_token_id=BOS_ID,
            forced_eos_token_id=None,
            use_cache=False,
        )
        model_class = transformers.MarianMTModel
    torch.manual_seed(SEED)
    return model_class(config)


class HFSeq2Seq(nn.Module):
    """A Hugging Face encoder-decoder behind seqmodels' seq2seq training interface
    (recipes.seq2seq_loss calls model(src, src_mask, tgt_in) -> logits)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor):
        out = self.hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt_in)
        return out.logits


# --- batches -----------------------------------------------------------------------------


def make_batches(name: str, size: dict, n: int) -> list[tuple[Batch, int]]:
    """n seqmodels batches (tensors, target tokens), the same in every process (seeded)."""
    rng = np.random.default_rng(SEED)
    vocab = size["vocab"]
    out = []
    for _ in range(n):
        if name == "gpt2":  # a random id stream: a Transformer's cost does not depend on ids
            ids = torch.from_numpy(rng.integers(4, vocab, (size["batch"], size["block"] + 1)))
            out.append(((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()), ids[:, 1:].numel()))
            continue
        # Sentence pairs in the trainer's own collation (padding, EOS, BOS-shifted target).
        lens = rng.integers(size["lo"], size["hi"] + 1, (2, size["batch"]))
        srcs = [np.append(rng.integers(4, vocab, k), EOS_ID) for k in lens[0]]
        tgts = [np.concatenate([[BOS_ID], rng.integers(4, vocab, k), [EOS_ID]]) for k in lens[1]]
        batch = collate(srcs, tgts, np.arange(size["batch"]))
        out.append((batch, int((batch[3] != PAD_ID).sum())))
    return out


def hf_batch(name: str, batch: Batch) -> dict[str, torch.Tensor]:
    """The same tensors as the Trainer's model inputs (made before timing starts)."""
    if name == "gpt2":
        x, y = batch
        # shift_labels: y is already shifted, so HF predicts exactly seqmodels' B x T targets
        # (labels alone would be shifted again: one prediction fewer per row). `labels` is
        # still needed: it switches the loss on and the Trainer counts its tokens.
        return {"input_ids": x, "labels": y, "shift_labels": y}
    src, src_mask, tgt_in, tgt_out = batch
    labels = tgt_out.masked_fill(tgt_out == PAD_ID, IGNORE_TARGET)  # HF ignores -100
    return {
        "input_ids": src,
        "attention_mask": src_mask,
        "decoder_input_ids": tgt_in,
        "labels": labels,
    }


def digest(batches: list[tuple[Batch, int]]) -> str:
    h = hashlib.sha256()
    for tensors, _ in batches:
        for t in tensors:
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# --- the two trainers --------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_seqmodels(name, size, batches, *, warmup: int, steps: int, device) -> tuple[float, dict]:
    """Seconds of steps warmup+1 .. warmup+steps in seqmodels' fit(), and the optimizer it
    used (make_optimizer's choice)."""
    stamps: dict[int, float] = {}

    def on_progress(progress) -> None:  # called after every optimizer step
        if progress.step in (warmup, warmup + steps):
            sync(device)
            stamps[progress.step] = time.perf_counter()

    settings = TrainSettings(
        max_steps=warmup + steps,
        lr=LR,
        warmup_steps=WARMUP_LR_STEPS,
        schedule="cosine",
        min_lr_ratio=0.0,
        clip_norm=1.0,
        eval_every=10**9,
        log_every=10**9,
        checkpoint_every=0,
        resume=False,
        seed=SEED,
        device=str(device),
    )
    if name == "gpt2":
        build, loss_fn = (lambda: HFCausalLM(build_hf_model(name, size))), lm_loss
    else:
        build, loss_fn = (lambda: HFSeq2Seq(build_hf_model(name, size))), seq2seq_loss(0.0)
    with tempfile.TemporaryDirectory(prefix="seqmodels-bench-") as tmp:
        job = FitJob(
            build_model=build,
            make_batches=lambda rank, world: iter(batches),
            valid_batches=[],
            loss_fn=loss_fn,
            settings=settings,
            out_dir=Path(tmp),
            model_identity={"type": f"bench-{name}"},
            on_progress=on_progress,
        )
        fit(job)
    opt = make_optimizer(nn.Linear(1, 1).to(device), settings, device)  # the same choice as fit's
    info = {"optim": "AdamW (make_optimizer)", "fused": bool(opt.defaults.get("fused"))}
    return stamps[warmup + steps] - stamps[warmup], info


def time_hf(
    name, size, batches, *, warmup: int, steps: int, device, optim: str | None
) -> tuple[float, dict]:
    """Seconds of steps warmup+1 .. warmup+steps in transformers.Trainer.train(), and the
    optimizer it used."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    stamps: dict[int, float] = {}

    class Stamps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after the optimizer step
            if state.global_step in (warmup, warmup + steps):
                sync(device)
                stamps[state.global_step] = time.perf_counter()

    class WholeBatches(torch.utils.data.IterableDataset):
        # An iterable dataset: the Trainer uses no sampler, so the order is kept.
        def __iter__(self):
            return iter([hf_batch(name, b) for b, _ in batches])

    model = build_hf_model(name, size)
    with tempfile.TemporaryDirectory(prefix="seqmodels-bench-hf-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=warmup + steps,
            per_device_train_batch_size=1,  # one item = one whole pre-made batch
            learning_rate=LR,
            warmup_steps=WARMUP_LR_STEPS,
            lr_scheduler_type="cosine",
            weight_decay=0.01,
            adam_beta1=0.9,
            adam_beta2=0.98,
            adam_epsilon=1e-8,
            max_grad_norm=1.0,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            bf16=device.type == "cuda",
            use_cpu=device.type == "cpu",
            seed=SEED,
            **({"optim": optim} if optim else {}),
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=WholeBatches(),
            data_collator=lambda items: items[0],
            callbacks=[Stamps()],
        )
        trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    info = {
        "optim": getattr(args.optim, "value", str(args.optim)),
        "fused": bool(opt.defaults.get("fused")),
    }
    return stamps[warmup + steps] - stamps[warmup], info


# --- one measurement per process -----------------------------------------------------------


def worker(args, device: torch.device) -> dict:
    """Time one contender on one model (this process does nothing else)."""
    size = SIZES[args.sizes][args.model]
    batches = make_batches(args.model, size, args.warmup + args.steps)
    if args.contender == "seqmodels":
        seconds, optim = time_seqmodels(
            args.model, size, batches, warmup=args.warmup, steps=args.steps, device=device
        )
    else:
        seconds, optim = time_hf(
            args.model,
            size,
            batches,
            warmup=args.warmup,
            steps=args.steps,
            device=device,
            optim=args.hf_optim,
        )
    tokens = sum(n for _, n in batches[args.warmup :])
    n_params = sum(p.numel() for p in build_hf_model(args.model, size).parameters())
    return {
        "contender": args.contender,
        "model": args.model,
        "seconds": seconds,
        "target_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "batches_sha256": digest(batches),
        "params_m": round(n_params / 1e6, 2),
        "optimizer": optim,
        "threads": torch.get_num_threads(),
    }


def measure(args, model: str, contender: str) -> dict:
    """Run worker() in a fresh subprocess; its last stdout line is its JSON."""
    cmd = [sys.executable, __file__, "--worker", contender, "--model", model]
    cmd += ["--device", args.device, "--sizes", args.sizes]
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    if args.hf_optim:
        cmd += ["--hf-optim", args.hf_optim]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{model}/{contender} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": [round(v, 2) for v in values],
    }


def summarise(model: str, size: dict, runs: dict[str, list[dict]], steps: int) -> dict:
    """Median / min / max tokens/s per contender, the ratios, what was run."""
    first = runs["seqmodels"][0]
    digests = {r["batches_sha256"] for rs in runs.values() for r in rs}
    assert len(digests) == 1, f"{model}: the contenders saw different batches {digests}"
    if model == "gpt2":
        batch = f"{size['batch']} x {size['block']} tokens"
    else:
        batch = f"{size['batch']} pairs, src/tgt lengths uniform in [{size['lo']}, {size['hi']}]"
    out = {
        "shape": {k: v for k, v in size.items() if k not in ("batch", "block", "lo", "hi")},
        "params_m": first["params_m"],
        "batch": batch,
        "target_tokens_per_step": round(first["target_tokens"] / steps, 1),
        "batches_sha256": digests.pop(),
    }
    for contender, rs in runs.items():
        out[f"{contender}_tokens_per_s"] = spread([r["tokens_per_s"] for r in rs])
        out[f"{contender}_optimizer"] = rs[0]["optimizer"]
    if "hf" in runs:
        s, h = out["seqmodels_tokens_per_s"], out["hf_tokens_per_s"]
        out["seqmodels_vs_hf"] = s["median"] / h["median"]
        pairs = zip(runs["seqmodels"], runs["hf"], strict=True)
        per_round = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs]
        out["seqmodels_vs_hf_per_round"] = [round(r, 3) for r in per_round]
        out["seqmodels_vs_hf_median_of_rounds"] = statistics.median(per_round)
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--cpu",
        dest="sizes",
        action="store_const",
        const="cpu",
        help="real models, small batches (default on CPU)",
    )
    mode.add_argument(
        "--full",
        dest="sizes",
        action="store_const",
        const="full",
        help="real models, GPU batches (default on CUDA)",
    )
    mode.add_argument(
        "--smoke",
        dest="sizes",
        action="store_const",
        const="smoke",
        help="tiny models, 1 + 1 steps, 1 round: a check",
    )
    mode.add_argument("--sizes", choices=sorted(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help="untimed steps first (default by sizes)")
    parser.add_argument("--steps", type=int, help="timed steps (default by sizes)")
    parser.add_argument("--rounds", type=int, help="measurements per contender (default by sizes)")
    parser.add_argument("--models", default="gpt2,marian")
    parser.add_argument("--hf-optim", help="TrainingArguments.optim (default: the Trainer's)")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="seqmodels only")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)  # the worker's model
    return parser.parse_args()  # fmt: skip


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    args.device = str(device)
    args.sizes = args.sizes or ("full" if device.type == "cuda" else "cpu")
    for key in ("warmup", "steps", "rounds"):
        value = getattr(args, key)
        setattr(args, key, max(1, value if value is not None else SIZES[args.sizes][key]))
    hf_version = hf_available()
    if hf_version is None:
        sys.exit("this benchmark needs transformers (pip install -e '.[bench]')")
    if args.worker:
        args.contender = args.worker
        print(json.dumps(worker(args, device)))
        return
    contenders = CONTENDERS if args.hf else CONTENDERS[:1]
    print(
        f"device {describe_device(device)}; sizes {args.sizes}; {args.warmup} warmup + "
        f"{args.steps} timed steps; {args.rounds} rounds; transformers {hf_version}",
        flush=True,
    )
    models = args.models.split(",")
    runs = {m: {c: [] for c in contenders} for m in models}
    for r in range(args.rounds):  # alternate who goes first, so drifting load hits both
        for model in models:
            for contender in contenders if r % 2 == 0 else contenders[::-1]:
                t = measure(args, model, contender)
                runs[model][contender].append(t)
                print(f"  round {r + 1} {model:6s} {contender:9s} {t['tokens_per_s']:10.1f} "
                      f"tokens/s ({t['seconds']:.2f} s)", flush=True)  # fmt: skip
    results = {m: summarise(m, SIZES[args.sizes][m], runs[m], args.steps) for m in models}
    for m, res in results.items():
        if "seqmodels_vs_hf" in res:
            print(f"  {m}: seqmodels / HF Trainer {res['seqmodels_vs_hf']:.3f} (medians)")
    print(json.dumps(figures(args, device, hf_version, results)))


def figures(args, device: torch.device, hf_version: str, results: dict) -> dict:
    try:
        accelerate = importlib.metadata.version("accelerate")
    except importlib.metadata.PackageNotFoundError:
        accelerate = None
    return {
        "bench": "hf_finetune_throughput",
        "device": describe_device(device),
        "date": time.strftime("%Y-%m-%d"),
        "sizes": args.sizes,
        "reduced": args.sizes != "full",
        "note": "real models, batches reduced for CPU" if args.sizes == "cpu" else args.sizes,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "rounds": args.rounds,
        "order": "seqmodels first in odd rounds, hf first in even rounds; one process each",
        "torch": torch.__version__,
        "transformers": hf_version,
        "accelerate": accelerate,
        "models": results,
    }


if __name__ == "__main__":
    main()
