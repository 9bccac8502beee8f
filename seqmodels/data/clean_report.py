"""The cleaning quality report: a JSON document and its Markdown summary.

What it holds: rows in and out per split, rows dropped per rule (with the first few examples,
by file and line), rows changed by each normalisation rule, length statistics and histograms
(characters and words) of the kept rows, the input-file fixes (BOM, CRLF, NUL, invalid UTF-8)
and the rules that were in force.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import polars as pl

from seqmodels.data.settings import CleanConfig
from seqmodels.files import atomic_write_text

SPLITS = ("train", "valid", "test")
_TOP = 10**9  # the last histogram bin is open-ended
# The start of a malformed prepared document or reader row: {"member": "...", "problem": "..."
_DOCUMENT_ROW = re.compile(r'^\{"member": ("(?:[^"\\]|\\.)*"), "problem": ("(?:[^"\\]|\\.)*")')
HISTOGRAM_EDGES = {
    "chars": [0, 10, 20, 40, 80, 160, 320, 640, 1280, _TOP],
    "words": [0, 1, 3, 6, 12, 25, 50, 100, 200, _TOP],
}


def build_report(
    files: list,
    *,
    counts: pl.DataFrame,
    examples: pl.DataFrame,
    fixes: pl.DataFrame,
    lengths: pl.DataFrame,
    columns: list[str],
    cfg: CleanConfig,
) -> dict[str, Any]:
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
    changed: dict[str, dict[str, int]] = {}
    for row in fixes.iter_rows(named=True):
        for name, value in row.items():
            if name != "split" and value:
                changed.setdefault(name.removeprefix("_fix_"), {})[row["split"]] = value
    return {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "dropped": dropped,
        "examples": {reason: ex for reason, ex in examples.iter_rows()},
        "changed_by_normalisation": changed,
        "lengths": {row["split"]: _lengths(row, columns) for row in lengths.iter_rows(named=True)},
        "input_files": [
            {
                "url": f.url,
                "sha256": f.sha256,
                "split": f.split,
                "lang": f.lang,
                "format": f.format,
                **(asdict(f.stats) if f.stats else {}),
            }
            for f in files
        ],
        "rules": cfg.model_dump(),
    }


def document_origin(example: dict[str, Any], column: str) -> str | None:
    """`member <path>: <problem>` for a malformed row of a prepared documents/reader file,
    else None.

    Such a row keeps its raw JSON line, which begins with the member and the problem (see
    seqmodels.data.documents); they are read with a pattern, not a JSON parser, because the
    line went through normalisation (an unescaped `&quot;` may have broken the JSON later on).
    """
    match = _DOCUMENT_ROW.match(str(example.get(column)))
    if match is None:
        return None
    try:
        member, problem = json.loads(match[1]), json.loads(match[2])
    except ValueError:
        return None
    return f"member {member}: {problem}"


def describe_example(example: dict[str, Any], column: str) -> str:
    """Where a dropped row came from (file and line, or archive member) and what it holds."""
    origin = document_origin(example, column)
    if origin is not None:
        return f"{example['source_file']} {origin}"
    return f"{example['source_file']} line {example['line']}: {str(example[column])[:80]!r}"


def _lengths(row: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in columns:
        for unit, edges in HISTOGRAM_EDGES.items():
            prefix = f"{c}_{unit}"
            stats = {q: row[f"{prefix}_{q}"] for q in ("mean", "p50", "p90", "p99", "max")}
            stats["histogram"] = [
                {"from": lo, "to": None if hi == _TOP else hi, "rows": row[f"{prefix}_hist_{lo}"]}
                for lo, hi in zip(edges, edges[1:], strict=False)
            ]
            out.setdefault(c, {})[unit] = stats
    return out


def _bar(rows: int, most: int, width: int = 30) -> str:
    return "█" * (round(width * rows / most) if most else 0)


def report_markdown(report: dict[str, Any]) -> str:
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
            name = ex["source_file"].rsplit("/", 1)[-1]
            origin = document_origin(ex, "src") if "src" in ex else None
            lines.append(f"  - `{name}:{ex['line']}` {origin or repr(text[:120])}")
    lines += ["", "## Rows changed by normalisation", ""]
    if not report["changed_by_normalisation"]:
        lines.append("No rows changed.")
    for rule, per_split in report["changed_by_normalisation"].items():
        lines.append(f"- **{rule}**: " + ", ".join(f"{s}: {n}" for s, n in per_split.items()))
    lines += [
        "",
        "## Input files",
        "",
        "| file | sha256 | lines | BOM | CRLF | NUL | invalid UTF-8 lines |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for f in report["input_files"]:
        name = f["url"].rsplit("/", 1)[-1]
        keys = ("lines", "bom_removed", "crlf_fixed", "nul_removed", "invalid_utf8_lines")
        digest = (f.get("sha256") or "")[:12]
        lines.append(f"| {name} | {digest} | " + " | ".join(str(f.get(k, "")) for k in keys) + " |")
    lines += corpus_version_markdown(report.get("corpus_version"))
    lines += ["", "## Segment lengths (kept rows)", ""]
    for split, per_column in sorted(report["lengths"].items()):
        for column, per_unit in per_column.items():
            for unit, s in per_unit.items():
                lines.append(
                    f"**{split} {column}, {unit}**: mean {s['mean']:.1f}, p50 {s['p50']:.0f}, "
                    f"p90 {s['p90']:.0f}, p99 {s['p99']:.0f}, max {s['max']}"
                )
                lines += ["", "```"]
                most = max(b["rows"] for b in s["histogram"])
                for b in s["histogram"]:
                    label = f"{b['from']}-{b['to'] - 1}" if b["to"] else f"{b['from']}+"
                    lines.append(f"{label:>10} {b['rows']:>10} {_bar(b['rows'], most)}")
                lines += ["```", ""]
    return "\n".join(lines) + "\n"


CHECKSUMS = {
    "manifest": "each file checked against the manifest's sha256",
    "trust_listing": "trust_listing: no manifest, digests computed after download",
    "unchecked": "no manifest and require_checksums off: digests computed after download",
}


def corpus_version_markdown(version: dict[str, Any] | None) -> list[str]:
    """The corpus version section: digest, file count and each growing entry's summary."""
    if version is None:
        return []
    lines = ["", "## Corpus version", "", f"`{version['digest']}`: {version['files']} files."]
    if version["sources"]:
        lines += [
            "",
            "| growing source | files | left for the next run | checksums |",
            "|---|---:|---:|---|",
        ]
    for s in version["sources"]:
        lines.append(
            f"| {s['url']} | {s['files']} | {len(s['left_for_next_run'])} "
            f"| {CHECKSUMS[s['checksums']]} |"
        )
    return lines


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write clean_report.json and clean_report.md atomically; return both paths."""
    json_path, md_path = out_dir / "clean_report.json", out_dir / "clean_report.md"
    for path, text in (
        (json_path, json.dumps(report, indent=2, default=str)),
        (md_path, report_markdown(report)),
    ):
        atomic_write_text(path, text)
    return json_path, md_path
