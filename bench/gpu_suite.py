"""One GPU suite: everything worth measuring on a lent GPU, in one command under 8 minutes.

    python bench/gpu_suite.py prepare --out DIR [--quick]     # here, on CPU, full venv
    python bench/gpu_suite.py run --inputs DIR --budget-s 480 [--quick] [--parts a,b]
        [--part-budget NAME=SECONDS ...] [--compile]

`prepare` runs seqmodels' own clean stage (Polars) on Multi30k de-en and Tiny Shakespeare
from the mirror (SEQMODELS_MIRROR, default ../shared/corpora), trains the SentencePiece
models, and writes them with a manifest (sha256 of every file) into DIR: a few MB that
travel to the GPU machine. `run` needs only torch, numpy, sentencepiece, pyarrow, sacrebleu
and pydantic (seqmodels' settings); transformers and ctranslate2 are optional (their
comparisons report "skipped: ..."). It never imports prefect, mlflow or polars.

Parts, each one JSON line (device and versions included), then a summary line:
  train_seq2seq, train_lm, train_lstm  bench/train_throughput.py's three shapes:
                                       seqmodels' trainer vs the plain loop vs HF;
  beam                                 beam 5 throughput: seqmodels vs HF generate vs
                                       CTranslate2 (seqmodels.models.ct2_export);
  mt                                   Multi30k de-en Transformer-base trained for a wall-clock
                                       budget by seqmodels' trainer, sacreBLEU on
                                       test_2016_flickr with beam 5;
  lm                                   Shakespeare Transformer LM, bits per character.
Every part runs under its own time budget (a share of --budget-s); a part over budget is
interrupted (SIGALRM) and reported as "over_budget", and the next part runs. `--quick`:
tiny sizes on the CPU, for CI's smoke tests. `--compile`: the training-throughput parts
torch.compile every contender (seqmodels' `compile: true`, the plain loop's and HF's model),
the next thing to try against HF on a GPU (plain PyTorch measured 1.05-1.12x HF on an H200).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

MANIFEST = "manifest.json"
MT_PARQUET, LM_PARQUET = "multi30k.parquet", "shakespeare.parquet"
MT_SPM, BENCH_SPM, LM_SPM = (
    "multi30k-spm.model",
    "multi30k-bench-spm.model",
    "shakespeare-spm.model",
)
# Shares of --budget-s per part (they add up to 0.95: the rest is start-up and slack). On an
# H200 (2026-12-04) one round of train_seq2seq took 26 s, train_lm 14 s, train_lstm 3 s and
# beam 15 s (without CTranslate2); the train parts now run two rounds.
BUDGET_SHARES = {
    "train_seq2seq": 0.15,
    "train_lm": 0.10,
    "train_lstm": 0.04,
    "beam": 0.11,
    "mt": 0.38,
    "lm": 0.17,
}
EVAL_RESERVE = 0.2  # share of the mt/lm parts' budget kept for loading and scoring


class OverBudget(Exception):
    pass


# --- prepare (CPU, full venv) -----------------------------------------------------------------


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clean_experiment(name: str, work: Path, train_rows: int | None, mirrors: list[str]) -> Path:
    """The experiment's corpus through seqmodels' clean stage; `train_rows` cuts the train
    split (a quick folder)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from seqmodels.config import load_config
    from seqmodels.data.clean import clean_corpus
    from seqmodels.data.corpus_reader import prepare_inputs
    from seqmodels.data.download import download_file

    experiment = load_config(ROOT / "configs" / "default.yaml").experiments[name]
    corpus = experiment.corpus
    raw = [download_file(f.url, f.sha256, work / "cache", mirrors) for f in corpus.files]
    inputs = prepare_inputs(raw, corpus, work)
    parquet, _ = clean_corpus(
        inputs,
        work / name,
        experiment.clean,
        corpus.kind,
        src_lang=corpus.src_lang,
        tgt_lang=corpus.tgt_lang,
    )
    if train_rows is not None:
        table = pq.read_table(parquet)
        is_train = pc.equal(table["split"], "train")
        keep = pc.or_(pc.invert(is_train), pc.less(table["id"], train_rows))
        pq.write_table(table.filter(keep), parquet)
    return parquet


def default_mirrors() -> list[str]:
    return (os.environ.get("SEQMODELS_MIRROR") or str(ROOT.parent / "shared" / "corpora")).split(
        ","
    )


def prepare(out: Path, quick: bool, mirrors: list[str] | None = None) -> dict:
    """Write the suite's inputs and their manifest into `out` (corpora from `mirrors`,
    default SEQMODELS_MIRROR or ../shared/corpora)."""
    mirrors = mirrors or default_mirrors()
    import shutil

    from seqmodels.data.settings import VocabConfig
    from seqmodels.data.vocab import train_sentencepiece

    out.mkdir(parents=True, exist_ok=True)
    rows = 2000 if quick else None
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        work = Path(tmp)
        sources = {
            MT_PARQUET: clean_experiment("mt-multi30k-de-en", work, rows, mirrors),
            LM_PARQUET: clean_experiment("lm-shakespeare", work, rows, mirrors),
        }
        # (file, parquet, columns, vocabulary size, quick size): the MT model's vocabulary,
        # the 16k one of bench/train_throughput.py, and the Shakespeare config's.
        vocabularies = [
            (MT_SPM, MT_PARQUET, ["src", "tgt"], 8000, 300),
            (BENCH_SPM, MT_PARQUET, ["src", "tgt"], 16000, 300),
            (LM_SPM, LM_PARQUET, ["text"], 2000, 200),
        ]
        for name, parquet, columns, size, quick_size in vocabularies:
            cfg = VocabConfig(model_type="unigram", vocab_size=quick_size if quick else size)
            model = train_sentencepiece(sources[parquet], columns, work / name, cfg)
            sources[name] = model
        for name, path in sources.items():
            shutil.copyfile(path, out / f".{name}.tmp")
            os.replace(out / f".{name}.tmp", out / name)
    files = {name: sha256(out / name) for name in sorted(sources)}
    manifest = {"quick": quick, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ"), "files": files}
    (out / f".{MANIFEST}.tmp").write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(out / f".{MANIFEST}.tmp", out / MANIFEST)
    size = sum((out / name).stat().st_size for name in files)
    return {**manifest, "bytes": size}


def check_inputs(inputs: Path) -> dict:
    """The manifest of a prepared folder, every file present and unchanged; else a
    ValueError naming the file."""
    manifest_path = inputs / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path}: missing (run `gpu_suite.py prepare --out {inputs}`)")
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest["files"].items():
        path = inputs / name
        if not path.is_file():
            raise ValueError(f"{path}: missing (listed in {manifest_path})")
        if sha256(path) != digest:
            raise ValueError(f"{path}: changed (sha256 differs from {manifest_path})")
    return manifest


# --- run: the device, the budget guard ------------------------------------------------------


def versions() -> dict:
    import numpy
    import sacrebleu
    import sentencepiece
    import torch

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numpy": numpy.__version__,
        "sentencepiece": sentencepiece.__version__,
        "sacrebleu": sacrebleu.__version__,
    }
    for optional in ("transformers", "ctranslate2"):
        try:
            out[optional] = __import__(optional).__version__
        except ImportError:
            out[optional] = None
    return out


def device_info(device) -> dict:
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        return {"device": f"cuda: {name}", "gpu_memory_gib": round(memory, 1), **versions()}
    return {"device": f"cpu: {platform.machine()}, {os.cpu_count()} cores", **versions()}


@contextmanager
def time_limit(seconds: float):
    """Raise OverBudget in the main thread once `seconds` have passed."""

    def alarm(signum, frame):
        raise OverBudget(f"over its budget of {seconds:.1f} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class SuiteRun:
    inputs: Path
    device: object  # torch.device
    quick: bool
    work: Path
    compile: bool = False  # torch.compile the training-throughput contenders


def run_part(name: str, budget_s: float, suite: SuiteRun) -> dict:
    """One part under its budget: its figures, or status over_budget / error."""
    started = time.perf_counter()
    line = {"part": name, "budget_s": round(budget_s, 1)}
    try:
        with time_limit(budget_s):
            figures = PARTS[name](suite, budget_s)
        line.update(status="ok", **figures)
    except OverBudget as e:
        line.update(status="over_budget", error=str(e))
    except Exception as e:  # one broken part must not sink the rest
        line.update(status="error", error=f"{type(e).__name__}: {e}")
    finally:
        from train_throughput import free_memory

        free_memory()  # the next part starts with the GPU's memory back
    line["seconds"] = round(time.perf_counter() - started, 2)
    return line


# --- the parts --------------------------------------------------------------------------------


def train_throughput_part(shape: str):
    def part(suite: SuiteRun, budget_s: float) -> dict:
        import train_throughput as tt
        from corpora import multi30k_from_parquet

        sizes = tt.SIZES["smoke" if suite.quick else "full"]
        hf = tt.hf_available() is not None
        # Two rounds in alternating order, each one's best kept (the bench's own method):
        # the first to run a shape pays CUDA's lazy kernel loading and cuBLAS's heuristics
        # for each new batch shape. On an H200 one round had seqmodels (run first) at
        # 0.19-0.30x the plain loop on the seq2seq shape's varying shapes and at 0.57x after
        # 25 warm-up steps (about 57 ms of host time a step under cProfile, against 47 ms for
        # a whole plain step); with two rounds it was at 0.99x.
        rounds = 1 if suite.quick else 2
        args = argparse.Namespace(
            warmup=sizes["warmup"],
            steps=sizes["steps"],
            rounds=rounds,
            hf=hf,
            compile=suite.compile,
        )
        data = multi30k_from_parquet(suite.inputs / MT_PARQUET)
        figures = tt.bench_model(
            shape, sizes[shape], args, suite.device, data, spm_path=suite.inputs / BENCH_SPM
        )
        if not hf and shape != "lstm":
            figures["hf"] = "skipped: transformers not installed"
        return {**figures, "compile": suite.compile}

    return part


def ctranslate2_figures(suite: SuiteRun, model_folder: Path, batches, beam: int) -> dict:
    """Seconds of CTranslate2 on the same batches (float16 on CUDA, int8 on the CPU) through
    seqmodels' exporter; {"ctranslate2_status": "skipped: ..."} without it or ctranslate2,
    "error: ..." when its translator cannot load on this device. Lengths are forced as for
    the others (min = max = L + 1 decoding steps)."""
    try:
        import ctranslate2

        from seqmodels.models.ct2_export import export_ctranslate2
    except ImportError as e:
        return {"ctranslate2_status": f"skipped: {e}"}
    import sentencepiece as spm

    quantization = "float16" if suite.device.type == "cuda" else "int8"
    exported = export_ctranslate2(model_folder, suite.work / "ct2", quantization)
    try:
        translator = ctranslate2.Translator(str(exported), device=suite.device.type)
    except (RuntimeError, OSError) as e:  # e.g. a wheel built for another CUDA (libcublas.so.12)
        return {"ctranslate2_status": f"error: {type(e).__name__}: {e}"}
    pieces = spm.SentencePieceProcessor(model_file=str(model_folder / "spm.model"))
    started = time.perf_counter()
    for srcs, L in batches:
        tokens = [pieces.id_to_piece(ids) for ids in srcs]
        translator.translate_batch(
            tokens, beam_size=beam, min_decoding_length=L + 1, max_decoding_length=L + 1
        )
    return {
        "ctranslate2_quantization": quantization,
        "ctranslate2_seconds": time.perf_counter() - started,
    }


def beam_part(suite: SuiteRun, budget_s: float) -> dict:
    import decode_throughput as dt
    import torch
    import train_throughput as tt

    size = dt.SIZES["smoke" if suite.quick else "full"]
    beam = 5
    data = __import__("corpora").multi30k_from_parquet(suite.inputs / MT_PARQUET)
    spm_path = suite.inputs / BENCH_SPM
    srcs, refs, vocab = tt.encode(data, "test", spm_path)
    srcs, refs = srcs[: size["sentences"]], refs[: size["sentences"]]
    arch = tt.seq2seq_architecture(size)
    batches = dt.make_batches(srcs, [len(r) for r in refs], size["batch"], arch.max_positions - 1)
    n_tokens = sum(len(s) * (L + 1) for s, L in batches)
    translator = dt.seqmodels_translator(
        arch, vocab, spm_path, suite.device, beam=beam, batch_size=size["batch"]
    )
    runners = {"seqmodels": lambda s, L: dt.run_seqmodels(translator, s, L)}
    out: dict = {"sentences": len(srcs), "beam": beam, "output_positions": n_tokens}
    if tt.hf_available():
        torch.manual_seed(0)
        model = tt.marian(arch, vocab, use_cache=True).to(suite.device).eval()
        if suite.device.type == "cuda":
            model = model.to(torch.bfloat16)
        runners["hf"] = lambda s, L: dt.run_hf(model, s, L, beam, suite.device)
    else:
        out["hf"] = "skipped: transformers not installed"
    seconds = dt.time_interleaved(runners, batches, 1, suite.device)
    for impl, secs in seconds.items():
        out[f"{impl}_sentences_per_s"] = len(srcs) / secs
        out[f"{impl}_tokens_per_s"] = n_tokens / secs
    if "hf" in seconds:
        out["seqmodels_vs_hf"] = seconds["hf"] / seconds["seqmodels"]
    for impl, secs in seconds.items():
        out[f"{impl}_seconds"] = secs
    folder = model_folder(arch, vocab, spm_path, suite.work / "beam-model")
    ct2 = ctranslate2_figures(suite, folder, batches, beam)
    if "ctranslate2_seconds" in ct2:
        ct2["ctranslate2_vs_hf"] = seconds.get("hf", 0) / ct2["ctranslate2_seconds"] or None
        ct2["ctranslate2_vs_seqmodels"] = seconds["seqmodels"] / ct2["ctranslate2_seconds"]
    out.update(ct2)
    return out


def model_folder(arch, vocab_size: int, spm_path: Path, out: Path) -> Path:
    """The random-weight model of the beam part (seed 0, as decode_throughput's
    seqmodels_translator builds it) as a model folder, for the CTranslate2 export."""
    import shutil

    import torch

    from seqmodels.models import FAMILIES
    from seqmodels.models.folder import FORMAT, META_FILE
    from seqmodels.training.trainer import save_weights

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    shutil.copyfile(spm_path, out / "spm.model")
    save_weights(FAMILIES["transformer_seq2seq"].build(arch, vocab_size), out)
    meta = {
        "format": FORMAT,
        "type": "transformer_seq2seq",
        "task": "translation",
        "architecture": arch.model_dump(mode="json"),
        "decoding": {"beam_size": 5},
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


@dataclass
class ModelSpec:
    """What seqmodels.models.folder.train_model needs of a config's model entry."""

    type: str
    architecture: object
    training: object


def train_for(suite: SuiteRun, spec: ModelSpec, task: str, data: tuple[str, str]) -> Path:
    """Train `spec` on a prepared (parquet, spm) pair into a fresh model folder."""
    from seqmodels.models.folder import train_model

    out_dir = Path(tempfile.mkdtemp(prefix=f"{spec.type}-", dir=suite.work))
    parquet, spm_model = data
    train_model(spec, task, suite.inputs / parquet, suite.inputs / spm_model, out_dir)
    return out_dir


def mt_part(suite: SuiteRun, budget_s: float) -> dict:
    """Transformer-base de-en trained for a wall-clock budget, sacreBLEU with beam 5."""
    from seqmodels.data.splits import read_split
    from seqmodels.evaluation.metrics import translation_metrics
    from seqmodels.models import get_family
    from seqmodels.models.folder import load_predictor

    family = get_family("transformer_seq2seq")
    big = dict(d_model=512, n_head=8, n_enc_layers=6, n_dec_layers=6, d_ff=2048, dropout=0.3)
    tiny = dict(d_model=32, n_head=2, n_enc_layers=1, n_dec_layers=1, d_ff=64, dropout=0.1)
    train_minutes = budget_s * (1 - EVAL_RESERVE) / 60
    training = family.Training(
        max_steps=4 if suite.quick else 100_000,
        batch_tokens=512 if suite.quick else 12288,
        valid_max_tokens=500 if suite.quick else None,
        lr=1e-3,
        warmup_steps=5 if suite.quick else 800,
        schedule="inverse_sqrt",  # no decay horizon: the run ends by the clock
        label_smoothing=0.1,
        eval_every=2 if suite.quick else 400,
        checkpoint_every=0,
        resume=False,
        max_train_minutes=train_minutes,
        device=str(suite.device),
    )
    spec = ModelSpec(
        "transformer_seq2seq", family.Architecture(**(tiny if suite.quick else big)), training
    )
    started = time.perf_counter()
    folder = train_for(suite, spec, "translation", (MT_PARQUET, MT_SPM))
    train_s = time.perf_counter() - started
    test = read_split(suite.inputs / MT_PARQUET, "test", ["src", "tgt"])
    if suite.quick:
        test = {k: v[:8] for k, v in test.items()}
    predictor = load_predictor(folder, str(suite.device))
    predictor.beam_size = 5
    predictor.batch_size = 8 if suite.quick else 128  # the test set in 8 batches on a GPU
    hypotheses = predictor.translate(test["src"])
    scores, signatures = translation_metrics(hypotheses, test["tgt"])
    return {
        "train_s": round(train_s, 1),
        "train_budget_s": round(train_minutes * 60, 1),
        "test_sentences": len(hypotheses),
        "bleu": scores["test_bleu"],
        "chrf": scores["test_chrf"],
        "bleu_signature": signatures["bleu"],
    }


def lm_part(suite: SuiteRun, budget_s: float) -> dict:
    """Shakespeare Transformer LM trained for a wall-clock budget; bits per character."""
    from seqmodels.data.splits import read_split
    from seqmodels.evaluation.metrics import language_model_metrics
    from seqmodels.models import get_family
    from seqmodels.models.folder import load_predictor

    family = get_family("transformer_lm")
    big = dict(n_layer=6, n_head=6, d_model=384, d_ff=1536, block_size=256, dropout=0.2)
    tiny = dict(n_layer=1, n_head=2, d_model=32, d_ff=64, block_size=32, dropout=0.1)
    train_minutes = budget_s * (1 - EVAL_RESERVE) / 60
    training = family.Training(
        max_steps=4 if suite.quick else 100_000,
        batch_tokens=512 if suite.quick else 32768,
        valid_max_tokens=500 if suite.quick else None,
        lr=1e-3,
        warmup_steps=5 if suite.quick else 200,
        schedule="inverse_sqrt",
        eval_every=2 if suite.quick else 300,
        checkpoint_every=0,
        resume=False,
        max_train_minutes=train_minutes,
        device=str(suite.device),
    )
    spec = ModelSpec(
        "transformer_lm", family.Architecture(**(tiny if suite.quick else big)), training
    )
    started = time.perf_counter()
    folder = train_for(suite, spec, "language_model", (LM_PARQUET, LM_SPM))
    train_s = time.perf_counter() - started
    lines = read_split(suite.inputs / LM_PARQUET, "test", ["text"])["text"]
    lines = lines[:100] if suite.quick else lines
    predictor = load_predictor(folder, str(suite.device))
    nll = sum(predictor.line_nll(lines))
    metrics = language_model_metrics(float(nll), predictor.n_predicted(lines), lines)
    return {
        "train_s": round(train_s, 1),
        "train_budget_s": round(train_minutes * 60, 1),
        "test_lines": len(lines),
        "bits_per_char": metrics["test_bits_per_char"],
        "ppl_per_token": metrics["test_ppl_per_token"],
    }


PARTS = {
    "train_seq2seq": train_throughput_part("seq2seq"),
    "train_lm": train_throughput_part("lm"),
    "train_lstm": train_throughput_part("lstm"),
    "beam": beam_part,
    "mt": mt_part,
    "lm": lm_part,
}


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    manifest = check_inputs(args.inputs)
    device = torch.device("cpu" if args.quick else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    overrides = dict(item.split("=", 1) for item in args.part_budget)
    parts = args.parts.split(",") if args.parts else list(PARTS)
    unknown = [p for p in parts + list(overrides) if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; parts: {', '.join(PARTS)}")
    info = device_info(device)
    lines = []
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        suite = SuiteRun(args.inputs, device, args.quick, Path(tmp), compile=args.compile)
        for name in parts:
            budget = float(overrides.get(name, BUDGET_SHARES[name] * args.budget_s))
            line = {**info, **run_part(name, budget, suite), "quick_inputs": manifest["quick"]}
            print(json.dumps(line), flush=True)
            lines.append(line)
    summary = {
        "summary": True,
        "budget_s": args.budget_s,
        "seconds": round(sum(line["seconds"] for line in lines), 2),
        "status": {line["part"]: line["status"] for line in lines},
        **info,
    }
    print(json.dumps(summary), flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="write the inputs folder (CPU, full venv)")
    prep.add_argument("--out", type=Path, required=True)
    prep.add_argument("--quick", action="store_true", help="2000 train rows, tiny vocabularies")
    go = commands.add_parser("run", help="run the suite on the prepared folder")
    go.add_argument("--inputs", type=Path, required=True)
    go.add_argument("--budget-s", type=float, default=480.0)
    go.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (CI smoke)")
    go.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)}")
    go.add_argument(
        "--part-budget", action="append", default=[], help="NAME=SECONDS: override a budget"
    )
    go.add_argument(
        "--compile", action="store_true", help="torch.compile the training-throughput contenders"
    )
    args = parser.parse_args(argv)
    if args.command == "prepare":
        print(json.dumps(prepare(args.out, args.quick)))
        return
    try:
        run(args)
    except ValueError as e:
        raise SystemExit(f"gpu_suite: {e}") from None


if __name__ == "__main__":
    main()
