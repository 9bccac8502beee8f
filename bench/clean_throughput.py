"""Clean-stage throughput: 10M parallel lines with Polars (seqmodels) against plain pandas.

    python bench/clean_throughput.py [--lines 10000000] [--skip-pandas]

Builds a parallel corpus by replicating the Multi30k de-en training pairs with deterministic
perturbations (exact copies, whitespace and NFD variants that normalise to copies, HTML
entities, control characters, identical sides, length-ratio and non-letter junk, unique
variants), so every rule and the de-duplication have real work. Multi30k val/test are the
eval splits. The corpus files come from the mirror (SEQMODELS_MIRROR, default
../shared/corpora) through seqmodels' own download code.

Each implementation runs in its own process, so its wall time and peak RSS are its own. The
clean stage is timed as the pipeline runs it: text preparation (BOM/CRLF/NUL/UTF-8 fixes)
plus the Polars plan that writes the Parquet. The pandas version applies the same rules with
the obvious pandas calls. The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import platform
import re
import resource
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_polars(folder: Path, out: Path) -> dict:
    # CleanConfig from its own module: seqmodels.config imports the model registry (torch),
    # which would count in this worker's peak RSS.
    from seqmodels.data.clean import InputFile, clean_corpus
    from seqmodels.data.settings import CleanConfig
    from seqmodels.data.textfile import prepare_text_file

    t0 = time.perf_counter()
    inputs = []
    for name, split in (("train", "train"), ("val", "valid"), ("test", "test")):
        for lang in ("de", "en"):
            raw = folder / f"{name}.{lang}"
            text = out / "text" / raw.name
            stats = prepare_text_file(raw, text)
            inputs.append(InputFile(text, f"file://{raw}", split, lang, stats))
    t1 = time.perf_counter()
    parquet, report = clean_corpus(inputs, out / "clean", CleanConfig(), "parallel", "de", "en")
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
        sides = {}
        for lang in ("de", "en"):
            raw = (folder / f"{name}.{lang}").read_bytes().replace(b"\r\n", b"\n")
            sides[lang] = raw.decode("utf-8", errors="replace").replace("\0", "").split("\n")[:-1]
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


def _worker(kind: str, folder: Path, out: Path) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--data", str(folder), "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=10_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/seqmodels-bench-clean"))
    parser.add_argument("--skip-pandas", action="store_true")
    parser.add_argument("--worker", choices=["polars", "pandas"])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        run = run_polars if args.worker == "polars" else run_pandas
        print(json.dumps(run(args.data, args.out)))
        return

    t0 = time.perf_counter()
    folder = build_corpus(args.workdir / f"corpus-{args.lines}", args.lines)
    print(f"corpus: {args.lines:,} pairs in {folder} ({time.perf_counter() - t0:.0f} s to build)")
    polars_result = _worker("polars", folder, args.workdir / "out-polars")
    lines_per_s = args.lines / polars_result["wall_s"]
    print(
        f"polars : {polars_result['wall_s']:.1f} s ({polars_result['prepare_s']:.1f} prepare + "
        f"{polars_result['clean_s']:.1f} clean), {lines_per_s:,.0f} pairs/s, "
        f"peak RSS {polars_result['peak_rss_mb']:,.0f} MB, rows out {polars_result['rows_out']}"
    )
    print(f"         dropped {polars_result['dropped']}")
    figures = {
        "bench": "clean_throughput",
        "lines": args.lines,
        "polars_wall_s": round(polars_result["wall_s"], 2),
        "polars_lines_per_s": round(lines_per_s),
        "polars_peak_rss_mb": round(polars_result["peak_rss_mb"]),
        "polars_rows_out": polars_result["rows_out"],
    }
    if not args.skip_pandas:
        pandas_result = _worker("pandas", folder, args.workdir / "out-pandas")
        print(
            f"pandas : {pandas_result['wall_s']:.1f} s, peak RSS "
            f"{pandas_result['peak_rss_mb']:,.0f} MB, rows out {pandas_result['rows_out']}"
        )
        print(f"         dropped {pandas_result['dropped']}")
        figures.update(
            pandas_wall_s=round(pandas_result["wall_s"], 2),
            pandas_peak_rss_mb=round(pandas_result["peak_rss_mb"]),
            pandas_rows_out=pandas_result["rows_out"],
            speedup_vs_pandas=round(pandas_result["wall_s"] / polars_result["wall_s"], 2),
        )
    figures.update(
        device=f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        date=time.strftime("%Y-%m-%d"),
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
