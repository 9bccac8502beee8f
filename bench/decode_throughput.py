"""Beam-search throughput: seqmodels' batched beam search against Hugging Face generate.

    python bench/decode_throughput.py [--device auto|cuda|cpu] [--sentences N]
        [--batch-size N] [--beam 5] [--warmup-batches N] [--quick | --full | --smoke] [--no-hf]
        [--no-ct2] [--rounds 3] [--vocab N] [--threads N]

A Transformer-base encoder-decoder (6+6 layers, d_model 512, FFN 2048, 8 heads, 16k joint
SentencePiece vocabulary trained on Multi30k train) with random weights translates the
source side of Multi30k test_2016_flickr with beam 5:
  - seqmodels: through seqmodels.inference.predictors.TranslationPredictor.translate_ids
    (what `seqmodels translate` and the registered model run: padding, bf16 autocast on
    CUDA, beam_search), the predictor loaded from a model folder by
    seqmodels.models.folder.load_predictor;
  - hf: MarianMTModel built from a config object with the same sizes (random weights,
    nothing downloaded), model.generate(num_beams=5); bf16 weights on CUDA, fp32 on CPU.

Random weights would end hypotheses at arbitrary points, so both produce the same number of
tokens: sentences are sorted by source length and cut into batches; every sentence of a
batch gets exactly L output tokens plus a final one, L being the longest reference
translation (in pieces) of the batch. seqmodels: max_len_a=0, max_len_b=L and the model's
EOS logit lowered by 1e4 (finite, so the EOS that beam search forces at max length still
ends every beam): L + 1 decoder steps, L tokens + EOS. Hugging Face: min_new_tokens =
max_new_tokens = L + 1 (EOS masked throughout): L + 1 decoder steps. Tokens/s counts these
L + 1 positions per sentence for both. The two take turns batch by batch (alternating
which goes first), so load from other processes on a shared host hits both alike. On CPU
the first 500 sentences are used (--quick) unless --full. The last line printed is one
JSON object.

On CPU, with ctranslate2 installed, the same weights are exported to CTranslate2 float32
and int8 (seqmodels.models.ct2_export) and timed too, forced to the same L + 1 decoder
steps (min_decoding_length = max_decoding_length = L + 1). They run in a worker process of
their own (CTranslate2's and torch's OpenMP threads spin-wait and slow each other in one
process), in rounds alternating with this process's PyTorch rounds; each side uses
--threads threads. Reported: the median over --rounds, the spread (slowest and fastest
round) and the ratios ct2_int8 / seqmodels, ct2_float32 / seqmodels, seqmodels / HF.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

# The Multi30k, SentencePiece, device and Hugging Face helpers of the training bench.
from corpora import multi30k
from train_throughput import (
    WORKDIR,
    describe_device,
    encode,
    hf_available,
    marian,
    sentencepiece_model,
    seq2seq_architecture,
    sync,
)

from seqmodels import EOS_ID, PAD_ID
from seqmodels.inference.ct2_predictors import CT2Layout
from seqmodels.inference.predictors import TranslationPredictor
from seqmodels.models import FAMILIES
from seqmodels.models.folder import FORMAT, META_FILE, load_predictor
from seqmodels.models.transformer_seq2seq import TransformerSeq2SeqArchitecture
from seqmodels.training.trainer import resolve_device, save_weights

EOS_PENALTY = 1e4
MODEL_TYPE = "transformer_seq2seq"  # the registered family (seqmodels.models.FAMILIES)

SIZES = {
    "full": {"vocab": 16000, "d": 512, "heads": 8, "layers": 6, "ff": 2048, "sentences": 1000,
             "batch": 64},
    "quick": {"vocab": 16000, "d": 512, "heads": 8, "layers": 6, "ff": 2048, "sentences": 500,
              "batch": 32},
    "smoke": {"vocab": 256, "d": 32, "heads": 2, "layers": 1, "ff": 64, "sentences": 8,
              "batch": 4, "spm_lines": 1000},
}  # fmt: skip


class NoEarlyEos(nn.Module):
    """Wraps a seqmodels seq2seq model: EOS only where beam search forces it (max length)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.max_positions = model.max_positions

    def encode(self, src, src_mask):
        return self.model.encode(src, src_mask)

    def init_state(self, memory):
        return self.model.init_state(memory)

    def decode_step(self, tokens, state, memory):
        logits, state = self.model.decode_step(tokens, state, memory)
        logits[:, EOS_ID] -= EOS_PENALTY
        return logits, state

    def reorder_state(self, state, index):
        return self.model.reorder_state(state, index)


def make_batches(srcs: list[list[int]], ref_lens: list[int], batch: int, limit: int):
    """Sentences sorted by source length, in batches; each batch with its output length L."""
    order = sorted(range(len(srcs)), key=lambda i: len(srcs[i]))
    out = []
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        L = min(max(ref_lens[i] for i in idx), limit)
        out.append(([srcs[i][: limit - 1] for i in idx], L))
    return out


def seqmodels_translator(
    arch: TransformerSeq2SeqArchitecture,
    vocab_size: int,
    spm_path: Path,
    device,
    *,
    beam: int,
    batch_size: int,
) -> TranslationPredictor:
    """A random-weight model folder (seqmodels.models.folder's layout: spm.model, model.pt,
    then seqmodels.json), loaded the way every user loads one."""
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="seqmodels-bench-"))
    # The folder stays (removed by the caller): the CTranslate2 contenders are exported from it.
    shutil.copyfile(spm_path, folder / "spm.model")
    save_weights(FAMILIES[MODEL_TYPE].build(arch, vocab_size), folder)
    meta = {
        "format": FORMAT,
        "type": MODEL_TYPE,
        "task": "translation",
        "architecture": arch.model_dump(mode="json"),
        "decoding": {"beam_size": beam, "batch_size": batch_size},
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    translator = load_predictor(folder, str(device))
    translator.model = NoEarlyEos(translator.model)
    translator.folder = folder
    return translator


def run_seqmodels(translator: TranslationPredictor, srcs: list[list[int]], L: int) -> None:
    translator.max_len_a, translator.max_len_b = 0.0, float(L)
    hyps = translator.translate_ids(srcs)
    assert all(len(h) == L for h in hyps), "seqmodels output lengths not forced"


@torch.inference_mode()
def run_hf(model, srcs: list[list[int]], L: int, beam: int, device) -> None:
    rows = [s + [EOS_ID] for s in srcs]  # as the predictor (and Marian's tokenizer) add EOS
    ids = torch.full((len(rows), max(len(r) for r in rows)), PAD_ID, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
    ids = ids.to(device)
    out = model.generate(
        input_ids=ids,
        attention_mask=ids != PAD_ID,
        num_beams=beam,
        do_sample=False,
        length_penalty=1.0,
        max_new_tokens=L + 1,
        min_new_tokens=L + 1,
    )
    assert out.shape[1] == L + 2, "HF output lengths not forced"  # + the decoder start


def time_interleaved(runners: dict, batches, warmup: int, device) -> dict[str, float]:
    """Seconds per implementation over all batches. The implementations take turns batch by
    batch (alternating who goes first), so load from other processes hits them alike."""
    for srcs, L in batches[:warmup]:
        for run in runners.values():
            run(srcs, L)
    seconds = dict.fromkeys(runners, 0.0)
    for i, (srcs, L) in enumerate(batches):
        names = list(runners) if i % 2 == 0 else list(runners)[::-1]
        for name in names:
            sync(device)
            t0 = time.perf_counter()
            runners[name](srcs, L)
            sync(device)
            seconds[name] += time.perf_counter() - t0
    return seconds


CT2_QUANTIZATIONS = ("float32", "int8")


def ct2_version() -> str | None:
    try:
        import ctranslate2
    except ImportError:
        return None
    return ctranslate2.__version__


def run_ct2(translator, tokens: list[list[str]], L: int, beam: int, layout: CT2Layout) -> None:
    """CTranslate2 forced to the same L + 1 decoder steps: no EOS before L + 1 tokens. With
    several replicas the batch is split into as many sub-batches, decoded in parallel."""
    results = translator.translate_batch(
        tokens,
        max_batch_size=layout.max_batch_size(len(tokens)),
        beam_size=beam,
        length_penalty=1.0,
        min_decoding_length=L + 1,
        max_decoding_length=L + 1,
        return_end_token=True,
    )
    assert all(len(r.hypotheses[0]) == L + 1 for r in results), "CT2 lengths not forced"


def ct2_worker(exports: str, *, threads: int, beam: int, replicas: int) -> None:
    """The CTranslate2 contenders in a process of their own (CTranslate2's and torch's
    OpenMP threads spin-wait, slowing each other when in one process). Reads the batches
    (one JSON line), then times every batch of each export for each "round" line.
    `replicas`: CTranslate2's inter_threads, each replica with threads // replicas threads
    (its throughput layout: a batch's sub-batches decode in parallel); 1: one translator
    with all the threads, seqmodels' CTranslate2 predictor's default (CT2Layout)."""
    import ctranslate2
    import sentencepiece as spm

    layout = CT2Layout(replicas=replicas, threads=threads)
    translators = {}
    for quantization in CT2_QUANTIZATIONS:
        folder = Path(exports) / quantization
        translators[f"ct2_{quantization}"] = ctranslate2.Translator(
            str(folder), device="cpu", **layout.runtime_options()
        )
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spm.model"))
    setup = json.loads(input())
    batches = [
        ([[sp.id_to_piece(i) for i in s + [EOS_ID]] for s in srcs], L)
        for srcs, L in setup["batches"]
    ]
    for tokens, L in batches[: setup["warmup"]]:
        for translator in translators.values():
            run_ct2(translator, tokens, L, beam, layout)
    print("ready", flush=True)
    for _ in iter(input, "done"):
        seconds = dict.fromkeys(translators, 0.0)
        for i, (tokens, L) in enumerate(batches):
            names = list(translators) if i % 2 == 0 else list(translators)[::-1]
            for name in names:
                t0 = time.perf_counter()
                run_ct2(translators[name], tokens, L, beam, layout)
                seconds[name] += time.perf_counter() - t0
        print(json.dumps(seconds), flush=True)


def start_ct2_worker(folder: Path, batches, *, warmup: int, threads: int, beam: int, replicas: int):
    """The folder exported to CTranslate2 (float32 and int8), and a worker process timing
    them (ct2_worker); None when ctranslate2 is not installed."""
    try:
        from seqmodels.models.ct2_export import export_ctranslate2
    except ImportError:
        return None
    if importlib.util.find_spec("ctranslate2") is None:
        return None
    exports = folder / "ct2"
    for quantization in CT2_QUANTIZATIONS:
        export_ctranslate2(folder, exports / quantization, quantization)
    worker = subprocess.Popen(
        [sys.executable, __file__, "--ct2-worker", str(exports), "--threads", str(threads),
         "--beam", str(beam), "--ct2-replicas", str(replicas)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    worker.stdin.write(json.dumps({"batches": batches, "warmup": warmup}) + "\n")
    worker.stdin.flush()
    assert worker.stdout.readline().strip() == "ready", "CTranslate2 worker failed"
    return worker


def ct2_round(worker) -> dict[str, float]:
    worker.stdin.write("round\n")
    worker.stdin.flush()
    return json.loads(worker.stdout.readline())


def timed_rounds(runners: dict, worker, batches, args, device) -> dict[str, list[float]]:
    """Seconds per contender in each round: the PyTorch ones here (taking turns batch by
    batch), then the CTranslate2 ones in their worker, while this process waits."""
    per_round: dict[str, list[float]] = {}
    for r in range(args.rounds):
        seconds = time_interleaved(runners, batches, args.warmup_batches if r == 0 else 0, device)
        if worker is not None:
            seconds.update(ct2_round(worker))
        for name, secs in seconds.items():
            per_round.setdefault(name, []).append(secs)
    if worker is not None:
        worker.stdin.write("done\n")
        worker.stdin.close()
        worker.wait(timeout=60)
    return per_round


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    parser.add_argument("--sentences", type=int, help="first N test sentences (default by sizes)")
    parser.add_argument("--batch-size", type=int, help="sentences per batch (default by sizes)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--warmup-batches", type=int, default=1, help="untimed batches first")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer sentences (default on CPU)")
    mode.add_argument("--full", action="store_true", help="all 1000 sentences (CUDA default)")
    mode.add_argument("--smoke", action="store_true", help="tiny model, 8 sentences: a check")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip Hugging Face")
    parser.add_argument("--no-ct2", dest="ct2", action="store_false", help="skip CTranslate2")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--vocab", type=int, help="SentencePiece vocabulary (default by sizes)")
    parser.add_argument(
        "--threads", type=int, help="CPU threads of each contender (default: torch's count)"
    )
    parser.add_argument(
        "--ct2-replicas",
        type=int,
        default=1,
        help="CTranslate2 replicas (inter_threads) sharing --threads; 1: one translator",
    )
    parser.add_argument("--ct2-worker", help=argparse.SUPPRESS)  # internal: see ct2_worker
    args = parser.parse_args()
    if args.ct2_replicas < 1:
        parser.error(f"--ct2-replicas must be at least 1, got {args.ct2_replicas}")
    return args


def summarise_rounds(
    per_round: dict[str, list[float]], *, sentences: int, tokens: int
) -> tuple[dict, dict]:
    """Each contender's median seconds, sentences/s and tokens/s with the spread over its
    rounds (slowest-fastest), and the ratios the targets are stated in; printed as well."""
    results = {}
    for impl in ("seqmodels", "hf", "ct2_float32", "ct2_int8"):
        rounds = sorted(per_round.get(impl, []))
        secs = statistics.median(rounds) if rounds else None
        results[f"{impl}_seconds"] = secs
        results[f"{impl}_sentences_per_s"] = sentences / secs if secs else None
        results[f"{impl}_tokens_per_s"] = tokens / secs if secs else None
        # Spread: tokens/s of the slowest and the fastest round.
        results[f"{impl}_tokens_per_s_spread"] = (
            [tokens / rounds[-1], tokens / rounds[0]] if rounds else None
        )

    def speedup(a: str, b: str) -> float | None:
        fast, slow = results[f"{a}_tokens_per_s"], results[f"{b}_tokens_per_s"]
        return fast / slow if fast and slow else None

    ratios = {
        "seqmodels_vs_hf": speedup("seqmodels", "hf"),
        "ct2_float32_vs_seqmodels": speedup("ct2_float32", "seqmodels"),
        "ct2_int8_vs_seqmodels": speedup("ct2_int8", "seqmodels"),
    }
    for impl in ("seqmodels", "hf", "ct2_float32", "ct2_int8"):
        if results[f"{impl}_tokens_per_s"]:
            low, high = results[f"{impl}_tokens_per_s_spread"]
            print(
                f"  {impl:11s} {results[f'{impl}_sentences_per_s']:9.2f} sentences/s "
                f"{results[f'{impl}_tokens_per_s']:10.1f} tokens/s (rounds {low:.1f}-{high:.1f})"
            )
    for name, ratio in ratios.items():
        if ratio:
            print(f"  {name} {ratio:.3f}")
    return results, ratios


def hf_runner(arch: TransformerSeq2SeqArchitecture, vocab: int, device, beam: int):
    """run_hf on MarianMT with the same sizes (random weights, seed 0); bf16 on CUDA, how HF
    users run fast inference."""
    torch.manual_seed(0)
    model = marian(arch, vocab, use_cache=True).to(device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    return lambda srcs, L: run_hf(model, srcs, L, beam, device)


def main() -> None:
    args = parse_args()
    threads = args.threads or torch.get_num_threads()
    if args.ct2_worker:
        ct2_worker(args.ct2_worker, threads=threads, beam=args.beam, replicas=args.ct2_replicas)
        return
    torch.set_num_threads(threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    sizes = "smoke" if args.smoke else "full" if args.full else "quick" if args.quick else None
    sizes = sizes or ("full" if device.type == "cuda" else "quick")
    size = SIZES[sizes]
    n_sent = args.sentences or size["sentences"]
    batch_size = args.batch_size or size["batch"]
    hf_version = hf_available() if args.hf else None
    print(
        f"device {describe_device(device)}; sizes {sizes}; beam {args.beam}; "
        f"Hugging Face {hf_version or 'not compared'}"
    )

    data = multi30k(WORKDIR / "cache")
    vocab_size = args.vocab or size["vocab"]
    spm_path = sentencepiece_model(data, vocab_size, WORKDIR, size.get("spm_lines"))
    srcs, refs, vocab = encode(data, "test", spm_path)
    srcs, refs = srcs[:n_sent], refs[:n_sent]
    arch = seq2seq_architecture(size)
    batches = make_batches(srcs, [len(r) for r in refs], batch_size, arch.max_positions - 1)
    n_tokens = sum(len(s) * (L + 1) for s, L in batches)  # decoder positions per sentence
    print(
        f"{len(srcs)} sentences in {len(batches)} batches of {batch_size}, "
        f"{n_tokens} output positions (mean {n_tokens / len(srcs):.1f} per sentence)"
    )

    translator = seqmodels_translator(
        arch, vocab, spm_path, device, beam=args.beam, batch_size=batch_size
    )
    n_params = sum(p.numel() for p in translator.model.parameters())
    runners = {"seqmodels": lambda srcs, L: run_seqmodels(translator, srcs, L)}
    if hf_version:
        runners["hf"] = hf_runner(arch, vocab, device, args.beam)
    worker = None
    if args.ct2 and device.type == "cpu":
        worker = start_ct2_worker(
            translator.folder,
            batches,
            warmup=args.warmup_batches,
            threads=threads,
            beam=args.beam,
            replicas=args.ct2_replicas,
        )
    per_round = timed_rounds(runners, worker, batches, args, device)
    shutil.rmtree(translator.folder, ignore_errors=True)
    results, ratios = summarise_rounds(per_round, sentences=len(srcs), tokens=n_tokens)
    reduced = sizes != "full" or n_sent < 1000
    figures = {
        "bench": "decode_throughput",
        "device": describe_device(device),
        "date": time.strftime("%Y-%m-%d"),
        "sizes": sizes,
        "reduced": reduced,
        "note": f"first {len(srcs)} of 1000 test sentences" if reduced else "all test sentences",
        "beam": args.beam,
        "sentences": len(srcs),
        "batch_size": batch_size,
        "output_positions": n_tokens,
        "forced_lengths": "per batch: longest reference (pieces) L; L tokens + EOS (seqmodels, "
        "EOS logit -1e4 until forced), min_new_tokens = max_new_tokens = L + 1 (HF)",
        "precision": "bf16 (seqmodels autocast, HF bf16 weights)"
        if device.type == "cuda"
        else "fp32",
        "params_m": round(n_params / 1e6, 2),
        "torch": torch.__version__,
        "transformers": hf_version,
        "threads": threads,
        "rounds": args.rounds,
        "ctranslate2": ct2_version(),
        "ct2_replicas": args.ct2_replicas,
        **results,
        **ratios,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
