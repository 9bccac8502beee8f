"""Clean a corpus with Polars into one zstd Parquet file plus a quality report.

Two streaming passes, so memory holds 8-byte segment hashes, never the text:
1. scan every source, assign splits, normalise, and give each row a `drop_reason` (the first
   rule it fails, or null); the result goes to a temporary Parquet file;
2. from that file, mark train rows that occur in valid/test and exact duplicates (first
   occurrence kept, by u64 hash of the segment or pair), then write the kept rows with the
   explicit schema and compute the report, all in one `collect_all`.
The output is written to a temp name and renamed, so it is either complete or absent.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import unicodedata
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import polars as pl

from seqmodels.data.clean_report import HISTOGRAM_EDGES, build_report, describe_example
from seqmodels.data.corpus_reader import (
    REFS_TYPE,
    AlignmentError,
    CorpusFormatError,
    InputFile,
    has_references,
    line_count,
    scan_corpus,
)
from seqmodels.data.entities import character_references, entity_table, unescape_html
from seqmodels.data.settings import CleanConfig
from seqmodels.files import atomic_path

__all__ = [
    "AlignmentError",
    "CorpusFormatError",
    "InputFile",
    "clean_corpus",
    "corpus_schema",
    "split_expr",
]

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
REFS_COLUMN = "refs"  # extra human references (summarisation): normalised, never filtered on
EXAMPLES_PER_RULE = 3
_ENTITY = r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);"
_MASK64 = (1 << 64) - 1


def corpus_schema(kind: str, references: bool = False) -> dict[str, pl.DataType]:
    """The cleaned Parquet's columns; a parallel corpus with references gets `refs` after `tgt`
    (every row a list, empty when it has none). Without references the schema is unchanged."""
    if kind != "parallel":
        return dict(MONOLINGUAL_SCHEMA)
    if not references:
        return dict(PARALLEL_SCHEMA)
    schema: dict[str, pl.DataType] = {}
    for name, dtype in PARALLEL_SCHEMA.items():
        schema[name] = dtype
        if name == "tgt":
            schema[REFS_COLUMN] = REFS_TYPE
    return schema


def _u64(value: int) -> pl.Expr:
    return pl.lit(value & _MASK64, dtype=pl.UInt64)


def _splitmix64(x: pl.Expr) -> pl.Expr:
    """SplitMix64 finaliser in wrapping u64 arithmetic: a stable, well-mixed hash."""
    x = x + _u64(0x9E3779B97F4A7C15)
    x = (x.xor(x // _u64(1 << 30))) * _u64(0xBF58476D1CE4E5B9)
    x = (x.xor(x // _u64(1 << 27))) * _u64(0x94D049BB133111EB)
    return x.xor(x // _u64(1 << 31))


def split_expr(file: InputFile, cfg: CleanConfig) -> pl.Expr:
    """The split of each row of `file`: its own, or by position or stable hash of the line."""
    if file.split is not None:
        return pl.lit(file.split)
    train_frac = 1 - cfg.valid_fraction - cfg.test_fraction
    if cfg.split_method == "hash":
        salt = (zlib.crc32(file.url.encode()) << 32) ^ cfg.split_seed
        bucket = _splitmix64(pl.col("line").cast(pl.UInt64) + _u64(salt)) % _u64(1_000_000)
        u = bucket.cast(pl.Float64) / 1_000_000
        train_end, valid_end = pl.lit(train_frac), pl.lit(1 - cfg.test_fraction)
    else:
        first = 2 if file.format == "tsv" and file.columns is None else 1
        n = line_count(file.path) - first + 1
        u = pl.col("line") - first
        train_end, valid_end = round(n * train_frac), round(n * (1 - cfg.test_fraction))
    return (
        pl.when(u < train_end)
        .then(pl.lit("train"))
        .when(u < valid_end)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("test"))
    )


def normalisation_steps(
    cfg: CleanConfig, references: Iterable[str] = ()
) -> list[tuple[str, str | None, Callable[[pl.Expr], pl.Expr]]]:
    """(rule name, pattern of the segments it applies to, transform), in order of application.

    Entities are decoded only in segments with a complete entity (html.unescape would also
    decode `&amp` without ";"), as they always were. NFC/NFKC only touch segments with a
    character that can change (normalising every segment costs 4x the test). The control
    character and whitespace rules need no pattern: they leave clean text as it is, and a
    test before them would cost about as much as the rule.

    Every transform is a native Polars expression, so the streaming engine runs the rules on
    all cores with no Python in the loop. `references`: the character references the corpus
    holds (`entities.character_references`), which the entity table is built from.
    """
    steps: list[tuple[str, str | None, Callable[[pl.Expr], pl.Expr]]] = []
    if cfg.unescape_html:
        patterns, replacements = entity_table(references)
        steps.append(("html_entities", _ENTITY, lambda s: unescape_html(s, patterns, replacements)))
    if cfg.unicode_normalization:
        form = cfg.unicode_normalization
        unstable = normalisation_unstable_class(form)
        steps.append((f"unicode_{form.lower()}", unstable, lambda s: s.str.normalize(form)))
    if cfg.remove_control_chars:
        chars, becomes = control_character_table()
        steps.append(("control_chars", None, lambda s: s.str.replace_many(chars, becomes)))
    if cfg.normalize_whitespace:
        # Every whitespace run that is not one space becomes one (not `\s+`: that matches
        # each single space too, so it would rewrite every segment), then the ends go.
        runs = r"\s\s+|[^\S ]"
        steps.append(("whitespace", None, lambda s: s.str.replace_all(runs, " ").str.strip_chars()))
    return steps


# Cc (except tab) become spaces; Cf go, except ZWNJ/ZWJ that some scripts need.
CONTROL_TO_SPACE, FORMAT_REMOVED = r"[\p{Cc}&&[^\t]]", r"[\p{Cf}&&[^\x{200C}\x{200D}]]"


@functools.lru_cache(maxsize=1)
def control_character_table() -> tuple[list[str], list[str]]:
    """The characters the control-character rule rewrites, and what each becomes.

    The sets are read from Polars' own regex classes (CONTROL_TO_SPACE, FORMAT_REMOVED: the
    Unicode version of its regex engine), so one `replace_many` pass over the table (Aho-
    Corasick; half the time of the two regex passes it replaces) changes exactly what those
    two `replace_all` passes would. About 0.3 s, once per process.
    """
    code_points = itertools.chain(range(0xD800), range(0xE000, sys.maxunicode + 1))
    every = pl.Series([chr(cp) for cp in code_points])
    to_space = every.filter(every.str.contains(CONTROL_TO_SPACE)).to_list()
    removed = every.filter(every.str.contains(FORMAT_REMOVED)).to_list()
    return to_space + removed, [" "] * len(to_space) + [""] * len(removed)


@functools.lru_cache(maxsize=2)
def normalisation_unstable_class(form: str) -> str:
    """A regex class of the characters that can change under Unicode normalisation `form`
    (NFC or NFKC): text with none of them is already normalised, so only the few segments
    with one are normalised (most non-ASCII text, precomposed umlauts included, needs nothing).

    The class holds every character the form changes on its own, every combining mark
    (canonical reordering), every character that composes with a preceding one (the non-first
    characters of each decomposition, and the Hangul vowels and trailing consonants), and
    every code point this Python's Unicode tables do not assign, so a character newer than
    them still goes through Polars' normaliser.
    """
    decomposed = "NFD" if form == "NFC" else "NFKD"
    unstable = set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))  # Hangul V and T jamo
    for cp in range(sys.maxunicode + 1):
        c = chr(cp)
        if unicodedata.category(c) == "Cn":  # most code points: skip the normalisations
            unstable.add(cp)
            continue
        if unicodedata.combining(c) or unicodedata.normalize(form, c) != c:
            unstable.add(cp)
        unstable.update(ord(x) for x in unicodedata.normalize(decomposed, c)[1:])
    ranges, start, prev = [], None, None
    for cp in sorted(unstable):
        if start is None or cp != prev + 1:
            if start is not None:
                ranges.append((start, prev))
            start = cp
        prev = cp
    ranges.append((start, prev))
    return "[" + "".join(f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges) + "]"


def _normalise(
    lf: pl.LazyFrame, columns: list[str], cfg: CleanConfig, lists: tuple[str, ...] = ()
) -> pl.LazyFrame:
    """Apply the normalisation steps in order to the string `columns` and to every element of
    the list columns `lists`; `_fix_<step>` says whether a step changed any of them in a row.

    A step with a pattern only rewrites the segments that match it (see
    `normalisation_steps`); the change flags compare each segment before and after.
    """
    references = character_references(lf, columns, lists) if cfg.unescape_html else ()
    everything = (*columns, *lists)
    for name, pattern, transform in normalisation_steps(cfg, references):

        def fixed(
            text: pl.Expr, pattern: str | None = pattern, transform: Callable = transform
        ) -> pl.Expr:
            if pattern is None:
                return transform(text)
            # when/then would run the transform on every row; on the nulls of the segments
            # that do not match it costs nothing, and those keep their text.
            return pl.coalesce(transform(pl.when(text.str.contains(pattern)).then(text)), text)

        lf = (
            lf.with_columns(
                **{
                    f"_new_{c}": pl.col(c).list.eval(fixed(pl.element()))
                    if c in lists
                    else fixed(pl.col(c))
                    for c in everything
                }
            )
            .with_columns(
                **{
                    f"_fix_{name}": pl.any_horizontal(
                        [(pl.col(f"_new_{c}") != pl.col(c)).fill_null(False) for c in everything]
                    )
                },
                **{c: pl.col(f"_new_{c}") for c in everything},
            )
            .drop([f"_new_{c}" for c in everything])
        )
    return lf


def _measure(lf: pl.LazyFrame, columns: list[str], cfg: CleanConfig) -> pl.LazyFrame:
    """Per-segment sizes: characters, words, letters (stored, so the report reuses them).

    The two scans of the text (spaces, and non-letters that are not spaces) run once each
    into scratch columns that the sizes are then computed from: written as one expression
    per size, the space count ran twice (once for the words, once for the letters).
    """
    counts, sizes = {}, {}
    for c in columns:
        # With whitespace normalised, spaces are single " ". Counted as a regex: Polars'
        # regex path finds them 18-22% faster than its literal=True one (same counts; 2M
        # Multi30k-like segments per language, medians of 7 alternating rounds).
        counts[f"_chars_{c}"] = pl.col(c).str.len_chars()
        counts[f"_spaces_{c}"] = (
            pl.col(c).str.count_matches(" ")
            if cfg.normalize_whitespace
            else pl.col(c).str.count_matches(r"\s")
        )
        # Letters among non-space characters: count the (few) non-letter, non-space ones.
        counts[f"_others_{c}"] = pl.col(c).str.count_matches(r"[^\p{L}\s]")
        chars, spaces = pl.col(f"_chars_{c}"), pl.col(f"_spaces_{c}")
        sizes[f"_words_{c}"] = (
            pl.when(chars == 0).then(0).otherwise(spaces + 1)
            if cfg.normalize_whitespace
            else pl.col(c).str.count_matches(r"\S+")
        ).cast(pl.Int64)
        non_space = chars - spaces
        sizes[f"_letters_{c}"] = (non_space - pl.col(f"_others_{c}")) / non_space.clip(
            lower_bound=1
        )
    scratch = [name for name in counts if not name.startswith("_chars_")]
    return lf.with_columns(**counts).with_columns(**sizes).drop(scratch)


def _drop_reason(columns: list[str], cfg: CleanConfig, parallel: bool) -> pl.Expr:
    """Name of the first rule a row fails, or null when it is kept (needs `_measure` columns)."""
    filtered = pl.col("split").is_in(cfg.filter_splits)
    chars = [pl.col(f"_chars_{c}") for c in columns]
    words = [pl.col(f"_words_{c}") for c in columns]
    rules: list[tuple[str, pl.Expr]] = [
        ("malformed", pl.col("_malformed")),
        ("empty", pl.any_horizontal([n == 0 for n in chars])),
        ("too_few_chars", pl.any_horizontal([n < cfg.min_chars for n in chars])),
        ("too_many_chars", pl.any_horizontal([n > cfg.max_chars for n in chars])),
        ("too_few_words", pl.any_horizontal([n < cfg.min_words for n in words])),
        ("too_many_words", pl.any_horizontal([n > cfg.max_words for n in words])),
    ]
    if parallel and cfg.max_length_ratio is not None:
        ratio = pl.max_horizontal(chars) / pl.min_horizontal(chars).clip(lower_bound=1)
        rules.append(("length_ratio", ratio > cfg.max_length_ratio))
    if cfg.min_letter_fraction is not None:
        low = [pl.col(f"_letters_{c}") < cfg.min_letter_fraction for c in columns]
        rules.append(("mostly_non_letters", pl.any_horizontal(low)))
    if parallel and cfg.drop_identical:
        rules.append(("identical_src_tgt", pl.col("src") == pl.col("tgt")))
    reason = pl.lit(None, dtype=pl.String)
    for name, failed in reversed(rules):
        always = name in ("malformed", "empty")
        reason = (
            pl.when(failed if always else filtered & failed).then(pl.lit(name)).otherwise(reason)
        )
    return reason


def _first_pass(
    units: list[tuple[InputFile, pl.LazyFrame]],
    columns: list[str],
    cfg: CleanConfig,
    lists: tuple[str, ...] = (),
) -> pl.LazyFrame:
    parallel = len(columns) == 2
    frames = []
    for index, (file, lf) in enumerate(units):
        frames.append(
            lf.select("line", "source_file", "_malformed", *columns, *lists).with_columns(
                split=split_expr(file, cfg),
                # A unique, ordered row number across files: keeps the first of duplicates.
                _row=pl.lit(index, dtype=pl.Int64) * (1 << 40) + pl.col("line"),
            )
        )
    lf = _measure(_normalise(pl.concat(frames), columns, cfg, lists), columns, cfg)
    key = pl.concat_str([pl.col(c) for c in columns], separator="\x1f").hash(seed=0)
    return lf.with_columns(
        drop_reason=_drop_reason(columns, cfg, parallel),
        _key=key,
        # Overlap with valid/test is judged on the source side: a test source seen in training
        # leaks the test set, whatever its translation.
        _eval_key=pl.col(columns[0]).hash(seed=0) if parallel else key,
    )


def _mark_overlap_and_duplicates(stage_path: Path, cfg: CleanConfig) -> pl.LazyFrame:
    """Mark train rows seen in valid/test, then exact duplicates (the first one is kept).

    The key sets are collected first (8 bytes a row) and applied with `is_in`, an elementwise
    expression, so the final pass streams in file order without a join buffering the text.
    """
    stage = pl.scan_parquet(stage_path)
    alive = pl.col("drop_reason").is_null()
    filtered = pl.col("split").is_in(cfg.filter_splits)
    marks = []
    if cfg.remove_eval_overlap:
        eval_keys = (
            stage.filter(alive & (pl.col("split") != "train"))
            .select(pl.col("_eval_key").unique())
            .collect(engine="streaming")
            .to_series()
        )
        in_eval = (pl.col("split") == "train") & pl.col("_eval_key").is_in(eval_keys.implode())
        marks.append(pl.when(alive & in_eval).then(pl.lit("overlaps_eval")))
    if cfg.deduplicate:
        first_rows = (
            stage.filter(alive & filtered)
            .group_by("split", "_key")
            .agg(pl.col("_row").min())
            .select("_row")
            .collect(engine="streaming")
            .to_series()
        )
        is_copy = alive & filtered & ~pl.col("_row").is_in(first_rows.implode())
        marks.append(pl.when(is_copy).then(pl.lit("duplicate")))
    return stage.with_columns(drop_reason=pl.coalesce("drop_reason", *marks))


def clean_corpus(
    files: list[InputFile],
    out_dir: Path,
    cfg: CleanConfig,
    kind: str,
    *,
    src_lang: str | None = None,
    tgt_lang: str | None = None,
) -> tuple[Path, dict]:
    """Clean `files` into `out_dir/corpus.parquet`; return its path and the quality report.

    A parallel corpus whose files carry references (documents/reader sources) gets a `refs`
    column (see `corpus_schema`)."""
    parallel = kind == "parallel"
    columns = ["src", "tgt"] if parallel else ["text"]
    lists = (REFS_COLUMN,) if parallel and has_references(files) else ()
    units = scan_corpus(files, kind, src_lang, tgt_lang)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "corpus.parquet"
    stage_path = out_dir / f".stage.parquet.tmp{os.getpid()}"  # scratch, always removed
    try:
        with atomic_path(target) as tmp:
            _first_pass(units, columns, cfg, lists).sink_parquet(stage_path, compression="lz4")
            schema = corpus_schema(kind, bool(lists))
            report = _second_pass(stage_path, Path(tmp), files, cfg, schema)
    finally:
        stage_path.unlink(missing_ok=True)
    return target, report


def _second_pass(
    stage_path: Path,
    out_path: Path,
    files: list[InputFile],
    cfg: CleanConfig,
    schema: dict[str, pl.DataType],
) -> dict:
    """De-duplicate and filter the staged rows into `out_path`; returns the quality report."""
    columns = ["src", "tgt"] if "src" in schema else ["text"]
    fixes = [f"_fix_{name}" for name, _, _ in normalisation_steps(cfg)]
    lf = _mark_overlap_and_duplicates(stage_path, cfg)
    kept = lf.filter(pl.col("drop_reason").is_null())
    queries = [
        kept.with_row_index("id")
        .select([pl.col(name).cast(dtype) for name, dtype in schema.items()])
        .sink_parquet(out_path, compression="zstd", lazy=True),
        lf.group_by("split", "drop_reason").agg(rows=pl.len()),
        _examples(lf, columns),
        lf.group_by("split").agg(pl.col(fixes).sum()) if fixes else pl.LazyFrame(),
        kept.group_by("split").agg(*_length_aggs(columns)),
    ]
    # Without common-subplan elimination: sharing the scan between the queries would cache
    # the whole corpus in memory; separate scans of the staged Parquet stream instead.
    no_cache = pl.QueryOptFlags(comm_subplan_elim=False)
    _, counts, examples, fixed, lengths = pl.collect_all(
        queries, engine="streaming", optimizations=no_cache
    )
    report = build_report(
        files,
        counts=counts,
        examples=examples,
        fixes=fixed,
        lengths=lengths,
        columns=columns,
        cfg=cfg,
    )
    malformed = report["dropped"].get("malformed")
    if malformed and cfg.on_malformed == "error":
        where = "; ".join(
            describe_example(ex, columns[0]) for ex in report["examples"]["malformed"]
        )
        raise CorpusFormatError(
            f"{sum(malformed.values())} malformed row(s) (a tsv row with the wrong number of "
            f"fields, a jsonl line that is not an object with the configured keys, or a "
            f"document or reader row without its source or target): "
            f"{where}. Fix the file or set clean.on_malformed: drop"
        )
    return report


def _examples(lf: pl.LazyFrame, columns: list[str]) -> pl.LazyFrame:
    """The first few dropped rows of each rule. Their row ids are found first (8 bytes a
    dropped row), so the text of the dropped rows is never gathered in memory."""
    dropped = lf.filter(pl.col("drop_reason").is_not_null())
    first_ids = (
        dropped.group_by("drop_reason")
        .agg(pl.col("_row").bottom_k(EXAMPLES_PER_RULE))
        .explode("_row")
        .collect(engine="streaming")["_row"]
    )
    return (
        dropped.filter(pl.col("_row").is_in(first_ids.implode()))
        .sort("_row")
        .group_by("drop_reason", maintain_order=True)
        .agg(pl.struct("split", "source_file", "line", *columns).alias("examples"))
    )


def _length_aggs(columns: list[str]) -> list[pl.Expr]:
    aggs = []
    for c in columns:
        for unit in ("chars", "words"):
            size, prefix = pl.col(f"_{unit}_{c}"), f"{c}_{unit}"
            aggs += [
                size.mean().alias(f"{prefix}_mean"),
                size.quantile(0.5).alias(f"{prefix}_p50"),
                size.quantile(0.9).alias(f"{prefix}_p90"),
                size.quantile(0.99).alias(f"{prefix}_p99"),
                size.max().alias(f"{prefix}_max"),
            ]
            for lo, hi in zip(HISTOGRAM_EDGES[unit], HISTOGRAM_EDGES[unit][1:], strict=False):
                aggs.append(((size >= lo) & (size < hi)).sum().alias(f"{prefix}_hist_{lo}"))
    return aggs
