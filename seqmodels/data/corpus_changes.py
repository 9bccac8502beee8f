"""What a new corpus version brings, against the previous one: files added and removed, the
train rows of the new files against the older ones (counts and length distribution), and how
much of the new text the vocabulary in use does not cover. Written beside the cleaning report
so whoever watches scheduled runs sees what changed before looking at any metric.

Library code: no Prefect or MLflow here.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from seqmodels.data.sources import CorpusVersion
from seqmodels.files import load_sentencepiece


def _lengths(frame: pl.DataFrame, column: str) -> dict[str, float | int]:
    """Characters per row of `column`: rows, mean, median, 90th percentile."""
    if frame.height == 0:
        return {"rows": 0}
    chars = frame[column].str.len_chars()
    return {
        "rows": frame.height,
        "mean_chars": round(float(chars.mean()), 1),
        "median_chars": float(chars.median()),
        "p90_chars": float(chars.quantile(0.9, interpolation="nearest")),
    }


def unknown_piece_rate(texts: list[str], sentencepiece_model: str | Path) -> float | None:
    """Fraction of SentencePiece pieces of `texts` that are the unknown piece: how much of
    the new text the vocabulary cannot spell (0 with byte fallback, which spells anything)."""
    sp = load_sentencepiece(sentencepiece_model)
    pieces = sp.encode(texts)
    total = sum(len(p) for p in pieces)
    if total == 0:
        return None
    unknown = sum(piece == sp.unk_id() for p in pieces for piece in p)
    return unknown / total


def describe_corpus_update(
    parquet: str | Path,
    current: CorpusVersion,
    previous: CorpusVersion | None,
    columns: list[str],
    sentencepiece_model: str | Path | None = None,
) -> dict:
    """The update from `previous` to `current` as seen in the cleaned `parquet` (its
    `source_file` column names each row's file): per text column, the length distribution of
    the train rows from new files and of the older ones, and the unknown-piece rate of the new
    rows under `sentencepiece_model` (the vocabulary in use before this update)."""
    changes = current.changes_since(previous)
    added = sorted({f.url for f in changes.added})
    update: dict = {
        "corpus_version": current.digest,
        "previous_corpus_version": previous.digest if previous else None,
        "files_added": added,
        "files_removed": sorted({f.url for f in changes.removed}),
    }
    train = pl.read_parquet(parquet, columns=["split", "source_file", *columns]).filter(
        pl.col("split") == "train"
    )
    is_new = pl.col("source_file").is_in(added)
    new_rows, old_rows = train.filter(is_new), train.filter(~is_new)
    update["rows_added"] = new_rows.height
    update["columns"] = {}
    for column in columns:
        described = {"new": _lengths(new_rows, column), "older": _lengths(old_rows, column)}
        if sentencepiece_model is not None and new_rows.height:
            rate = unknown_piece_rate(new_rows[column].to_list(), sentencepiece_model)
            described["new_unknown_piece_rate"] = rate
        update["columns"][column] = described
    return update


def corpus_update_markdown(update: dict) -> str:
    """The update as a Markdown section (for the Prefect artifact and MLflow)."""
    previous = update["previous_corpus_version"] or "none (first version)"
    lines = [
        f"## Corpus version {update['corpus_version']} (previous: {previous})",
        "",
        f"- files added: {len(update['files_added'])}, removed: {len(update['files_removed'])}",
        f"- train rows from new files (after cleaning): {update['rows_added']}",
        "",
        "| column | rows | new: mean / median / p90 chars | older: mean / median / p90 chars"
        " | unknown pieces in new rows |",
        "|---|---|---|---|---|",
    ]
    for column, described in update["columns"].items():
        new, older = described["new"], described["older"]
        rate = described.get("new_unknown_piece_rate")
        lines.append(
            f"| {column} | {new['rows']} new, {older['rows']} older | {_distribution(new)}"
            f" | {_distribution(older)} | {'-' if rate is None else f'{rate:.2%}'} |"
        )
    for url in update["files_added"]:
        lines.append(f"- added: `{url}`")
    for url in update["files_removed"]:
        lines.append(f"- removed: `{url}`")
    return "\n".join(lines) + "\n"


def _distribution(lengths: dict) -> str:
    if not lengths["rows"]:
        return "-"
    return f"{lengths['mean_chars']} / {lengths['median_chars']:g} / {lengths['p90_chars']:g}"
