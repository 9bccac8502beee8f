"""The CTranslate2 predictor as a server runs it, under each replica layout.

    python bench/ct2_serving.py [--replicas 1,2] [--quantization int8,float32]
        [--sentences 256] [--batch-size 32] [--rounds 2] [--threads N] [--smoke]

What `mlflow models serve` and `seqmodels translate` run for a CTranslate2 export:
`load_predictor(folder).translate(sources)`, with its real decoding (beam 5, the maximum
length seqmodels sets, hypotheses cut there re-scored), not the forced lengths of
bench/decode_throughput.py. The model is that bench's random-weight Transformer-base (vocab
8k by default), exported to each quantization; its outputs run to the maximum length, a
heavy but steady workload. Each layout is SEQMODELS_CT2_REPLICAS=N with
SEQMODELS_CT2_THREADS=--threads (seqmodels.inference.ct2_predictors.CT2Layout), timed in a
process of its own (one warm-up batch, then every source), the layouts alternating within
each round and their order reversed every other round. One JSON line: seconds per layout
and round, medians, the words of each quantization's translations (the same under every
layout, or the bench fails: they must do the same work), and each layout's speed-up over
the first one listed (one replica by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from corpora import multi30k
from decode_throughput import SIZES, seqmodels_translator
from train_throughput import WORKDIR, encode, sentencepiece_model, seq2seq_architecture

from seqmodels.inference.ct2_predictors import REPLICAS_ENV, THREADS_ENV, CT2Layout, usable_cores


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", default="1,2", help="comma-separated layouts to compare")
    parser.add_argument("--quantization", default="int8,float32", help="comma-separated")
    parser.add_argument("--sentences", type=int, default=256, help="first N test sources")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--smoke", action="store_true", help="tiny model, 8 sources: a check")
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # EXPORT SOURCES_JSON
    args = parser.parse_args()
    try:
        args.replicas = [int(r) for r in args.replicas.split(",")]
    except ValueError:
        parser.error(f"--replicas: comma-separated whole numbers, got {args.replicas!r}")
    if min(args.replicas) < 1:
        parser.error(f"--replicas must all be at least 1, got {args.replicas}")
    for n in args.replicas:  # the predictor's own check (fewer threads than replicas)
        try:
            CT2Layout(replicas=n, threads=args.threads)
        except ValueError as e:
            parser.error(str(e))
    return args


def time_predictor(export: str, sources_json: str, batch_size: int) -> None:
    """In its own process (the layout is in its environment): print the seconds taken."""
    from seqmodels.models.folder import load_predictor

    sources = json.loads(Path(sources_json).read_text())
    predictor = load_predictor(Path(export), device="cpu")
    predictor.translate(sources[:batch_size])  # warm-up
    started = time.perf_counter()
    outputs = predictor.translate(sources)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "words": sum(len(o.split()) for o in outputs)}))


def exports(args: argparse.Namespace, work: Path) -> tuple[dict[str, Path], Path]:
    """The bench's random-weight model exported to each quantization, and the sources."""
    from seqmodels.models.ct2_export import export_ctranslate2

    size = dict(SIZES["smoke" if args.smoke else "quick"])
    vocab = size["vocab"] if args.smoke else args.vocab
    data = multi30k(WORKDIR / "cache")
    spm_path = sentencepiece_model(data, vocab, WORKDIR, size.get("spm_lines"))
    _, _, vocab_size = encode(data, "test", spm_path)
    arch = seq2seq_architecture(size)
    translator = seqmodels_translator(
        arch, vocab_size, spm_path, torch.device("cpu"), beam=5, batch_size=args.batch_size
    )
    try:
        folders = {
            q: export_ctranslate2(translator.folder, work / q, q)
            for q in args.quantization.split(",")
        }
    finally:
        shutil.rmtree(translator.folder, ignore_errors=True)
    sources = work / "sources.json"
    n = 8 if args.smoke else args.sentences
    sources.write_text(json.dumps(data["test.de"][:n]))
    return folders, sources


def timed_layouts(
    args: argparse.Namespace, folders: dict[str, Path], sources: Path
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per (quantization, replicas) for each round, every one in its own process, and
    the words of each quantization's translations (the same under every layout)."""
    seconds: dict[str, list[float]] = {}
    words: dict[str, set[int]] = {}
    for r in range(args.rounds):
        runs = [(q, n) for q in folders for n in args.replicas]
        for q, n in runs if r % 2 == 0 else runs[::-1]:
            env = {**os.environ, REPLICAS_ENV: str(n), THREADS_ENV: str(args.threads)}
            command = [sys.executable, __file__, "--worker", str(folders[q]), str(sources)]
            command += ["--batch-size", str(args.batch_size)]
            out = subprocess.run(command, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{q}, {n} replicas: the worker failed\n{out.stderr[-3000:]}")
            line = json.loads(out.stdout.strip().splitlines()[-1])
            seconds.setdefault(f"{q}_replicas_{n}", []).append(round(line["seconds"], 4))
            words.setdefault(q, set()).add(line["words"])
    differing = {q: sorted(w) for q, w in words.items() if len(w) > 1}
    if differing:
        raise SystemExit(f"the layouts translated differently (words per run): {differing}")
    return seconds, {q: w.pop() for q, w in words.items()}


def main() -> None:
    args = parse_args()
    if args.worker:
        time_predictor(*args.worker, batch_size=args.batch_size)
        return
    import ctranslate2

    with tempfile.TemporaryDirectory(prefix="ct2-serving-") as tmp:
        folders, sources = exports(args, Path(tmp))
        n_sources = len(json.loads(sources.read_text()))
        seconds, words = timed_layouts(args, folders, sources)
    figures = {
        "bench": "ct2_serving",
        "device": "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "sizes": "smoke" if args.smoke else "quick",
        "reduced": bool(args.smoke),
        "ctranslate2": ctranslate2.__version__,
        "threads": args.threads,
        "sentences": n_sources,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "seconds": seconds,
        "output_words": words,
        "median_seconds": {k: round(statistics.median(v), 3) for k, v in seconds.items()},
    }
    base = args.replicas[0]
    for q in folders:
        for n in args.replicas[1:]:
            one = figures["median_seconds"][f"{q}_replicas_{base}"]
            figures[f"{q}_replicas_{n}_vs_{base}"] = round(
                one / figures["median_seconds"][f"{q}_replicas_{n}"], 3
            )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
