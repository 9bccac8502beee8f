"""Clean-stage throughput: 10M parallel lines with Polars (seqmodels) against plain pandas,
and 1M lines against Hugging Face `datasets` map/filter.

    python bench/clean_throughput.py [--lines 10000000] [--hf-lines 1000000] [--rounds 1]
                                     [--skip-pandas] [--skip-datasets]

Builds a parallel corpus by replicating the Multi30k de-en training pairs with deterministic
perturbations (exact copies, whitespace and NFD variants that normalise to copies, HTML
entities, control characters, identical sides, length-ratio and non-letter junk, unique
variants), so every rule and the de-duplication have real work. Multi30k val/test are the
eval splits. The corpus files come from the mirror (SEQMODELS_MIRROR, default
../shared/corpora) through seqmodels' own download code.

Each implementation runs in its own process, so its wall time and peak RSS are its own. The
clean stage is timed as the pipeline runs it: text preparation (BOM/CRLF/NUL/UTF-8 fixes)
plus the Polars plan that writes the Parquet. The pandas version applies the same rules with
the obvious pandas calls; the `datasets` version applies them with batched `Dataset.map`
and `Dataset.filter` on both cores (num_proc=2), what many users would reach for. Contenders
alternate within each round (Polars, pandas, Polars on the small corpus, datasets); medians and
min-max over the rounds. The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = 10


def _perturb(kind: int, v: int, de: str, en: str, de_nfd: str) -> tuple[str, str]:
    if kind <= 1:  # exact copies
        return de, en
    if kind == 2:  # whitespace noise: a copy after normalisation
        return de.replace(" ", "  ") + "\t", " " + en
    if kind == 3:  # decomposed umlauts: a copy after NFC
        return de_nfd, en
    if kind == 4:  # a genuinely new pair
        return f"{de} ({v})", f"{en} ({v})"
    if kind == 5:  # HTML entities: new pair after unescaping
        return f"{de} &amp; Nr.&nbsp;{v}", f"{en} &amp; no.&#160;{v}"
    if kind == 6:  # target far longer than source
        return de, " ".join([en] * 4)
    if kind == 7:  # untranslated copy
        return de, de
    if kind == 8:  # control characters
        return f"{de}\x07 {v}", f"{en}\x1b {v}"
    return f"{v} -- {v * 7} ... {v % 97}!", f"{v} -- ???"  # mostly non-letters


def build_corpus(folder: Path, lines: int) -> Path:
    """Write train.de/train.en (`lines` pairs) plus val/test; reused when already there."""
    done = folder / "DONE"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    from corpora import multi30k

    data = multi30k(folder / "cache")
    de, en = data["train.de"], data["train.en"]
    de_nfd = [unicodedata.normalize("NFD", s) for s in de]
    n = len(de)
    with (
        open(folder / "train.de", "w", encoding="utf-8") as out_de,
        open(folder / "train.en", "w", encoding="utf-8") as out_en,
    ):
        for start in range(0, lines, 100_000):
            block_de, block_en = [], []
            for i in range(start, min(start + 100_000, lines)):
                b, v = i % n, i // n
                kind = (v * 7 + b) % KINDS if v else 4  # the first copy is the original corpus
                s, t = (de[b], en[b]) if v == 0 else _perturb(kind, v, de[b], en[b], de_nfd[b])
                block_de.append(s)
                block_en.append(t)
            out_de.write("\n".join(block_de) + "\n")
            out_en.write("\n".join(block_en) + "\n")
    for split, name in (("valid", "val"), ("test", "test")):
        for lang in ("de", "en"):
            (folder / f"{name}.{lang}").write_text("\n".join(data[f"{split}.{lang}"]) + "\n")
    done.write_text("ok")
    return folder


def _peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a worker would report
    # the parent's peak (the corpus builder) when that is higher than its own.
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_polars(folder: Path, out: Path) -> dict:
    # CleanConfig from its own module: seqmodels.config imports the model registry (torch),
    # which would count in this worker's peak RSS.
    from seqmodels.data.clean import clean_corpus
    from seqmodels.data.corpus_reader import prepare_inputs
    from seqmodels.data.settings import CleanConfig, CorpusConfig

    t0 = time.perf_counter()
    raw = [folder / f"{name}.{lang}" for name in ("train", "val", "test") for lang in ("de", "en")]
    splits = {"train": "train", "val": "valid", "test": "test"}
    corpus = CorpusConfig(
        kind="parallel", src_lang="de", tgt_lang="en",
        files=[{"url": f"file://{p}", "split": splits[p.stem], "lang": p.suffix[1:]} for p in raw],
    )  # fmt: skip
    inputs = prepare_inputs(raw, corpus, out)  # as the pipeline's clean stage prepares them
    t1 = time.perf_counter()
    parquet, report = clean_corpus(
        inputs, out / "clean", CleanConfig(), "parallel", src_lang="de", tgt_lang="en"
    )
    t2 = time.perf_counter()
    return {
        "wall_s": t2 - t0,
        "prepare_s": t1 - t0,
        "clean_s": t2 - t1,
        "peak_rss_mb": _peak_rss_mb(),
        "rows_out": report["rows_out"],
        "dropped": {k: sum(v.values()) for k, v in report["dropped"].items()},
        "parquet_mb": parquet.stat().st_size / 2**20,
    }


def _char_class(category_prefix: str, keep: str = "") -> str:
    chars = [
        chr(c)
        for c in range(sys.maxunicode + 1)
        if unicodedata.category(chr(c)).startswith(category_prefix) and chr(c) not in keep
    ]
    return "[" + "".join(re.escape(c) for c in chars) + "]"


def run_pandas(folder: Path, out: Path) -> dict:
    """The same rules as CleanConfig() with straightforward pandas string methods."""
    import pandas as pd

    from seqmodels.data.settings import CleanConfig  # not seqmodels.config: no torch here

    cfg = CleanConfig()
    t0 = time.perf_counter()
    frames = []
    for name, split in (("train", "train"), ("val", "valid"), ("test", "test")):
        sides = _read_split(folder, name)
        frames.append(pd.DataFrame({"split": split, "src": sides["de"], "tgt": sides["en"]}))
    df = pd.concat(frames, ignore_index=True)
    entity = r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);"
    control, fmt = _char_class("Cc", keep="\t"), _char_class("Cf", keep="\u200c\u200d")
    for col in ("src", "tgt"):
        s = df[col]
        has = s.str.contains(entity, regex=True)
        s = s.where(~has, s[has].map(html.unescape))
        s = s.str.normalize("NFC")
        s = s.str.replace(control, " ", regex=True).str.replace(fmt, "", regex=True)
        df[col] = s.str.replace(r"\s+", " ", regex=True).str.strip()
    filtered = df["split"].isin(cfg.filter_splits)
    reason = pd.Series([None] * len(df), dtype=object)

    def mark(name: str, failed: pd.Series, always: bool = False) -> None:
        hit = failed & reason.isna() & (True if always else filtered)
        reason[hit] = name

    chars = {c: df[c].str.len() for c in ("src", "tgt")}
    words = {c: df[c].str.count(r"\S+") for c in ("src", "tgt")}
    mark("empty", (chars["src"] == 0) | (chars["tgt"] == 0), always=True)
    mark("too_few_chars", (chars["src"] < cfg.min_chars) | (chars["tgt"] < cfg.min_chars))
    mark("too_many_chars", (chars["src"] > cfg.max_chars) | (chars["tgt"] > cfg.max_chars))
    mark("too_few_words", (words["src"] < cfg.min_words) | (words["tgt"] < cfg.min_words))
    mark("too_many_words", (words["src"] > cfg.max_words) | (words["tgt"] > cfg.max_words))
    longer = pd.concat(chars, axis=1).max(axis=1)
    shorter = pd.concat(chars, axis=1).min(axis=1).clip(lower=1)
    mark("length_ratio", longer / shorter > cfg.max_length_ratio)
    low = []
    for c in ("src", "tgt"):
        non_space = chars[c] - df[c].str.count(r"\s")
        letters = df[c].str.count(r"[^\W\d_]")
        low.append(letters / non_space.clip(lower=1) < cfg.min_letter_fraction)
    mark("mostly_non_letters", low[0] | low[1])
    mark("identical_src_tgt", df["src"] == df["tgt"])
    alive = reason.isna()
    eval_src = set(df.loc[alive & (df["split"] != "train"), "src"])
    mark("overlaps_eval", (df["split"] == "train") & df["src"].isin(eval_src))
    alive = reason.isna()
    dup = df[alive & filtered].duplicated(subset=["split", "src", "tgt"])
    reason[dup[dup].index] = "duplicate"
    kept = df[reason.isna()].reset_index(drop=True)
    kept.insert(0, "id", range(len(kept)))
    out.mkdir(parents=True, exist_ok=True)
    kept.to_parquet(out / "pandas.parquet", compression="zstd", index=False)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "peak_rss_mb": _peak_rss_mb(),
        "rows_out": kept["split"].value_counts().to_dict(),
        "dropped": reason.value_counts().to_dict(),
    }


def _python_rules():
    """The normalisation rules and the drop-rule inputs as plain Python (pandas, datasets)."""
    from seqmodels.data.settings import CleanConfig  # not seqmodels.config: no torch here

    cfg = CleanConfig()
    entity = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")
    control = re.compile(_char_class("Cc", keep="\t"))
    fmt = re.compile(_char_class("Cf", keep="\u200c\u200d"))
    space = re.compile(r"\s+")

    def normalise(s: str) -> str:
        if entity.search(s):
            s = html.unescape(s)
        s = unicodedata.normalize("NFC", s)
        s = fmt.sub("", control.sub(" ", s))
        return space.sub(" ", s).strip()

    return cfg, normalise


def _read_split(folder: Path, name: str) -> dict[str, list[str]]:
    sides = {}
    for lang in ("de", "en"):
        raw = (folder / f"{name}.{lang}").read_bytes().replace(b"\r\n", b"\n")
        sides[lang] = raw.decode("utf-8", errors="replace").replace("\0", "").split("\n")[:-1]
    return sides


def run_datasets(folder: Path, out: Path) -> dict:
    """The same rules with Hugging Face `datasets`: batched map to normalise and measure, filter
    per rule, and a Python set for eval overlap and exact duplicates (datasets has none)."""
    import datasets

    datasets.disable_progress_bars()
    cfg, normalise = _python_rules()
    words, letter = re.compile(r"\S+"), re.compile(r"[^\W\d_]")
    t0 = time.perf_counter()
    parts = []
    for name, split in (("train", "train"), ("val", "valid"), ("test", "test")):
        sides = _read_split(folder, name)
        rows = {"split": [split] * len(sides["de"]), "src": sides["de"], "tgt": sides["en"]}
        parts.append(datasets.Dataset.from_dict(rows))
    ds = datasets.concatenate_datasets(parts)

    def clean_batch(batch: dict) -> dict:
        src = [normalise(s) for s in batch["src"]]
        tgt = [normalise(t) for t in batch["tgt"]]
        reasons = []
        for split, s, t in zip(batch["split"], src, tgt, strict=True):
            reasons.append(_drop_reason(cfg, split, s, t, words=words, letter=letter))
        return {"src": src, "tgt": tgt, "reason": reasons}

    # Declared types: a batch whose rows are all kept would otherwise type `reason` as null.
    text = datasets.Value("string")
    features = datasets.Features({"split": text, "src": text, "tgt": text, "reason": text})
    ds = ds.map(clean_batch, batched=True, batch_size=10_000, num_proc=2, features=features)
    alive = ds.filter(lambda b: [r is None for r in b["reason"]], batched=True, num_proc=2)
    eval_src = {s for s, sp in zip(alive["src"], alive["split"], strict=True) if sp != "train"}
    seen: set[tuple[str, str, str]] = set()

    def keep(batch: dict) -> list[bool]:
        flags = []
        for split, s, t in zip(batch["split"], batch["src"], batch["tgt"], strict=True):
            if split == "train" and s in eval_src:
                flags.append(False)
                continue
            key = (split, s, t)
            flags.append(split not in cfg.filter_splits or key not in seen)
            seen.add(key)
        return flags

    kept = alive.filter(keep, batched=True).remove_columns("reason")  # one process: the sets
    out.mkdir(parents=True, exist_ok=True)
    kept.to_parquet(out / "datasets.parquet")
    wall = time.perf_counter() - t0
    splits = kept["split"]
    return {
        "wall_s": wall,
        "peak_rss_mb": _peak_rss_mb(),
        "rows_out": {s: splits.count(s) for s in ("train", "valid", "test") if s in splits},
    }


def _drop_reason(cfg, split: str, s: str, t: str, *, words: re.Pattern, letter: re.Pattern):
    """The first rule a normalised pair fails (the Polars plan's order), or None."""
    if not s or not t:
        return "empty"
    if split not in cfg.filter_splits:
        return None  # valid/test rows are only dropped when empty
    cs, ct = len(s), len(t)
    ws, wt = len(words.findall(s)), len(words.findall(t))
    if min(cs, ct) < cfg.min_chars:
        return "too_few_chars"
    if max(cs, ct) > cfg.max_chars:
        return "too_many_chars"
    if min(ws, wt) < cfg.min_words:
        return "too_few_words"
    if max(ws, wt) > cfg.max_words:
        return "too_many_words"
    if max(cs, ct) / max(min(cs, ct), 1) > cfg.max_length_ratio:
        return "length_ratio"
    for x in (s, t):  # whitespace is single spaces by now
        non_space = len(x) - x.count(" ")
        if len(letter.findall(x)) / max(non_space, 1) < cfg.min_letter_fraction:
            return "mostly_non_letters"
    return "identical_src_tgt" if s == t else None


def _worker(kind: str, folder: Path, out: Path) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--data", str(folder), "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "n": len(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=10_000_000)
    parser.add_argument("--hf-lines", type=int, default=1_000_000, help="corpus for datasets")
    parser.add_argument("--rounds", type=int, default=1, help="contenders alternate per round")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/seqmodels-bench-clean"))
    parser.add_argument("--skip-pandas", action="store_true")
    parser.add_argument("--skip-datasets", action="store_true")
    parser.add_argument("--worker", choices=["polars", "pandas", "datasets"])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        run = {"polars": run_polars, "pandas": run_pandas, "datasets": run_datasets}[args.worker]
        shutil.rmtree(args.out, ignore_errors=True)  # nothing prepared by an earlier round
        print(json.dumps(run(args.data, args.out)))
        return

    big = build_corpus(args.workdir / f"corpus-{args.lines}", args.lines)
    small = build_corpus(args.workdir / f"corpus-{args.hf_lines}", args.hf_lines)
    plan = [("polars", big)]
    plan += [] if args.skip_pandas else [("pandas", big)]
    plan += [] if args.skip_datasets else [("polars", small), ("datasets", small)]
    runs: dict[tuple[str, Path], list[dict]] = {}
    for round_ in range(args.rounds):
        for kind, folder in plan:
            result = _worker(kind, folder, args.workdir / f"out-{kind}")
            runs.setdefault((kind, folder), []).append(result)
            print(
                f"round {round_ + 1} {kind:8s} {folder.name}: {result['wall_s']:.1f} s, "
                f"peak RSS {result['peak_rss_mb']:,.0f} MB, rows out {result['rows_out']}"
            )

    def figures_of(kind: str, folder: Path) -> dict:
        results = runs[(kind, folder)]
        return {
            "wall_s": _spread([r["wall_s"] for r in results]),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in results)),
            "rows_out": results[-1]["rows_out"],
        }

    figures = {"bench": "clean_throughput", "lines": args.lines, "rounds": args.rounds}
    figures["polars"] = polars = figures_of("polars", big)
    polars["prepare_s"] = _spread([r["prepare_s"] for r in runs[("polars", big)]])
    polars["lines_per_s"] = round(args.lines / polars["wall_s"]["median"])
    if not args.skip_pandas:
        figures["pandas"] = pandas = figures_of("pandas", big)
        figures["pandas_over_polars"] = round(
            pandas["wall_s"]["median"] / polars["wall_s"]["median"], 2
        )
        figures["same_rows_as_pandas"] = pandas["rows_out"] == polars["rows_out"]
    if not args.skip_datasets:
        figures["hf_lines"] = args.hf_lines
        figures["polars_small"] = small_polars = figures_of("polars", small)
        figures["datasets"] = hf = figures_of("datasets", small)
        figures["datasets_over_polars"] = round(
            hf["wall_s"]["median"] / small_polars["wall_s"]["median"], 2
        )
        figures["same_rows_as_datasets"] = hf["rows_out"] == small_polars["rows_out"]
    figures.update(
        device=f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        date=time.strftime("%Y-%m-%d"),
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
