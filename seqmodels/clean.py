"""Clean a corpus with Polars into one Parquet file plus a quality report.

Every input line gets a `drop_reason` (the first rule it fails, or null), so one lazy plan
both writes the kept rows and counts the dropped ones. Filters apply to the train split only;
valid and test are normalised but otherwise left alone, so scores on them stay comparable to
published numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from seqmodels.config import CleanConfig
from seqmodels.textfile import TextFileStats

# The explicit output schemas: column order and types are part of the contract.
MONOLINGUAL_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.Int64(),
    "split": pl.String(),
    "text": pl.String(),
    "source_file": pl.String(),
    "line": pl.Int64(),
}
PARALLEL_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.Int64(),
    "split": pl.String(),
    "src": pl.String(),
    "tgt": pl.String(),
    "source_file": pl.String(),
    "line": pl.Int64(),
}
SPLITS = ("train", "valid", "test")
EXAMPLES_PER_RULE = 3


@dataclass
class InputFile:
    """A prepared (UTF-8, LF) text file and where it came from."""

    path: Path
    url: str
    split: str | None = None
    lang: str | None = None
    stats: TextFileStats | None = None


class AlignmentError(ValueError):
    pass


def _scan(file: InputFile, column: str) -> pl.LazyFrame:
    return pl.scan_lines(file.path, name=column, row_index_name="line", row_index_offset=1)


def _line_count(file: InputFile) -> int:
    return pl.scan_lines(file.path).select(pl.len()).collect().item()


def _normalise(column: str, cfg: CleanConfig) -> pl.Expr:
    expr = pl.col(column)
    if cfg.unicode_normalization:
        expr = expr.str.normalize(cfg.unicode_normalization)
    # Control characters become spaces, then runs of whitespace collapse to one space.
    expr = expr.str.replace_all(r"[\p{Cc}\p{Cf}&&[^\t]]", " ").str.replace_all(r"\s+", " ")
    return expr.str.strip_chars()


def _monolingual_frame(files: list[InputFile], cfg: CleanConfig) -> pl.LazyFrame:
    frames = []
    for file in files:
        lf = _scan(file, "text").with_columns(source_file=pl.lit(file.url))
        if file.split is not None:
            split = pl.lit(file.split)
        else:
            # Deterministic split by position: first (1 - v - t) train, then valid, then test.
            n = _line_count(file)
            train_end = round(n * (1 - cfg.valid_fraction - cfg.test_fraction))
            valid_end = round(n * (1 - cfg.test_fraction))
            split = (
                pl.when(pl.col("line") <= train_end)
                .then(pl.lit("train"))
                .when(pl.col("line") <= valid_end)
                .then(pl.lit("valid"))
                .otherwise(pl.lit("test"))
            )
        frames.append(lf.with_columns(split=split))
    return pl.concat(frames).with_columns(text=_normalise("text", cfg))


def _parallel_frame(
    files: list[InputFile], src_lang: str, tgt_lang: str, cfg: CleanConfig
) -> pl.LazyFrame:
    frames = []
    for split in SPLITS:
        src = [f for f in files if f.split == split and f.lang == src_lang]
        tgt = [f for f in files if f.split == split and f.lang == tgt_lang]
        if not src and not tgt:
            continue
        if len(src) != 1 or len(tgt) != 1:
            raise AlignmentError(
                f"split {split!r} needs exactly one {src_lang} and one {tgt_lang} file, "
                f"got {len(src)} and {len(tgt)}"
            )
        s, t = src[0], tgt[0]
        ns, nt = _line_count(s), _line_count(t)
        if ns != nt:
            raise AlignmentError(
                f"aligned files differ in length: {s.url} has {ns} lines, {t.url} has {nt}"
            )
        pair = _scan(s, "src").join(_scan(t, "tgt"), on="line", how="inner", maintain_order="left")
        frames.append(pair.with_columns(split=pl.lit(split), source_file=pl.lit(s.url)))
    return pl.concat(frames).with_columns(src=_normalise("src", cfg), tgt=_normalise("tgt", cfg))


def _drop_reason(columns: list[str], cfg: CleanConfig, parallel: bool) -> pl.Expr:
    """Name of the first rule a row fails, or null when it is kept."""
    is_train = pl.col("split") == "train"
    chars = [pl.col(c).str.len_chars() for c in columns]
    words = [pl.col(c).str.count_matches(r"\S+") for c in columns]
    rules: list[tuple[str, pl.Expr]] = [
        ("empty", pl.any_horizontal([n == 0 for n in chars])),
        ("too_short", is_train & pl.any_horizontal([n < cfg.min_chars for n in chars])),
        ("too_long_chars", is_train & pl.any_horizontal([n > cfg.max_chars for n in chars])),
        ("too_long_words", is_train & pl.any_horizontal([n > cfg.max_words for n in words])),
    ]
    if parallel and cfg.max_length_ratio is not None:
        ratio = pl.max_horizontal(chars) / pl.min_horizontal(chars).clip(lower_bound=1)
        rules.append(("length_ratio", is_train & (ratio > cfg.max_length_ratio)))
    if parallel:
        rules.append(("identical_src_tgt", is_train & (pl.col("src") == pl.col("tgt"))))
    reason = pl.lit(None, dtype=pl.String)
    for name, failed in reversed(rules):
        reason = pl.when(failed).then(pl.lit(name)).otherwise(reason)
    return reason


def _mark_duplicates(lf: pl.LazyFrame, columns: list[str], cfg: CleanConfig) -> pl.LazyFrame:
    """Mark exact duplicates within a split and train rows that also occur in valid/test."""
    key = pl.concat_str([pl.col(c) for c in columns], separator="\x1f")
    lf = lf.with_columns(_key=key)
    alive = pl.col("drop_reason").is_null()
    if cfg.remove_eval_overlap:
        in_eval = (
            lf.filter((pl.col("split") != "train") & alive)
            .select("_key")
            .unique()
            .with_columns(_in_eval=pl.lit(True))
        )
        lf = lf.join(in_eval, on="_key", how="left", maintain_order="left").with_columns(
            drop_reason=pl.when(alive & (pl.col("split") == "train") & pl.col("_in_eval"))
            .then(pl.lit("overlaps_eval"))
            .otherwise(pl.col("drop_reason"))
        )
    if cfg.deduplicate:
        first = pl.int_range(pl.len()).over(["split", "_key", "drop_reason"]) == 0
        lf = lf.with_columns(
            drop_reason=pl.when(alive & (pl.col("split") == "train") & ~first)
            .then(pl.lit("duplicate"))
            .otherwise(pl.col("drop_reason"))
        )
    return lf.drop("_key", "_in_eval", strict=False)


def clean_corpus(
    files: list[InputFile],
    out_dir: Path,
    cfg: CleanConfig,
    kind: str,
    src_lang: str | None = None,
    tgt_lang: str | None = None,
) -> tuple[Path, dict]:
    """Clean `files` into `out_dir/corpus.parquet`; return its path and the quality report."""
    parallel = kind == "parallel"
    columns = ["src", "tgt"] if parallel else ["text"]
    if parallel:
        lf = _parallel_frame(files, src_lang or "", tgt_lang or "", cfg)
    else:
        lf = _monolingual_frame(files, cfg)
    lf = lf.with_columns(drop_reason=_drop_reason(columns, cfg, parallel))
    lf = _mark_duplicates(lf, columns, cfg)

    schema = PARALLEL_SCHEMA if parallel else MONOLINGUAL_SCHEMA
    kept = (
        lf.filter(pl.col("drop_reason").is_null())
        .with_row_index("id")
        .select([pl.col(name).cast(dtype) for name, dtype in schema.items()])
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "corpus.parquet"
    tmp = out_dir / f".corpus.parquet.tmp{os.getpid()}"
    counts = lf.group_by("split", "drop_reason").agg(pl.len().alias("rows"))
    examples = (
        lf.filter(pl.col("drop_reason").is_not_null())
        .group_by("drop_reason", maintain_order=True)
        .agg(
            pl.struct("split", "source_file", "line", *columns)
            .head(EXAMPLES_PER_RULE)
            .alias("examples")
        )
    )
    length_column = "tgt" if parallel else "text"
    lengths = (
        lf.filter(pl.col("drop_reason").is_null())
        .with_columns(chars=pl.col(length_column).str.len_chars())
        .group_by("split")
        .agg(
            pl.col("chars").mean().alias("mean"),
            *[pl.col("chars").quantile(q).alias(f"p{int(q * 100)}") for q in (0.5, 0.9, 0.99)],
            pl.col("chars").max().alias("max"),
        )
    )
    try:
        _, counts_df, examples_df, lengths_df = pl.collect_all(
            [kept.sink_parquet(tmp, compression="zstd", lazy=True), counts, examples, lengths],
            engine="streaming",
        )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    report = _report(files, counts_df, examples_df, lengths_df, cfg)
    return target, report


def _report(
    files: list[InputFile],
    counts: pl.DataFrame,
    examples: pl.DataFrame,
    lengths: pl.DataFrame,
    cfg: CleanConfig,
) -> dict:
    rows_in = {s: 0 for s in SPLITS}
    rows_out = {s: 0 for s in SPLITS}
    dropped: dict[str, dict[str, int]] = {}
    for split, reason, rows in counts.iter_rows():
        rows_in[split] += rows
        if reason is None:
            rows_out[split] += rows
        else:
            dropped.setdefault(reason, {}).setdefault(split, 0)
            dropped[reason][split] += rows
    return {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "dropped": dropped,
        "examples": {r: ex for r, ex in examples.iter_rows()},
        "length_chars": {row["split"]: row for row in lengths.iter_rows(named=True)},
        "input_files": [
            {
                "url": f.url,
                "split": f.split,
                "lang": f.lang,
                **(f.stats.__dict__ if f.stats else {}),
            }
            for f in files
        ],
        "rules": cfg.model_dump(),
    }


def report_markdown(report: dict) -> str:
    """The quality report as a Markdown summary (for MLflow and the Prefect UI)."""
    lines = ["# Cleaning report", "", "| split | rows in | rows out |", "|---|---:|---:|"]
    for split in SPLITS:
        if report["rows_in"][split]:
            lines.append(f"| {split} | {report['rows_in'][split]} | {report['rows_out'][split]} |")
    lines += ["", "## Dropped rows by rule", ""]
    if not report["dropped"]:
        lines.append("No rows dropped.")
    for reason, per_split in sorted(report["dropped"].items()):
        total = sum(per_split.values())
        lines.append(
            f"- **{reason}**: {total} ({', '.join(f'{s}: {n}' for s, n in per_split.items())})"
        )
        for ex in report["examples"].get(reason, []):
            text = " ||| ".join(str(ex[c]) for c in ("text", "src", "tgt") if c in ex)
            lines.append(
                f"  - `{ex['source_file'].rsplit('/', 1)[-1]}:{ex['line']}` {text[:120]!r}"
            )
    lines += [
        "",
        "## Input fixes",
        "",
        "| file | lines | BOM | CRLF | NUL | invalid UTF-8 lines |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for f in report["input_files"]:
        name = f["url"].rsplit("/", 1)[-1]
        counts = [f.get(k, "") for k in ("lines", "bom_removed", "crlf_fixed", "nul_removed")]
        counts.append(f.get("invalid_utf8_lines", ""))
        lines.append(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")
    lines += [
        "",
        "## Segment length in characters (kept rows)",
        "",
        "| split | mean | p50 | p90 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for split, s in sorted(report["length_chars"].items()):
        quantiles = " | ".join(f"{s[q]:.0f}" for q in ("p50", "p90", "p99"))
        lines.append(f"| {split} | {s['mean']:.1f} | {quantiles} | {s['max']} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    json_path, md_path = out_dir / "clean_report.json", out_dir / "clean_report.md"
    for path, text in (
        (json_path, json.dumps(report, indent=2, default=str)),
        (md_path, report_markdown(report)),
    ):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return json_path, md_path
