"""HTML entity decoding as a native Polars expression that equals Python's `html.unescape`.

`html.unescape` scans left to right for the longest reference at each "&" (its regex is
greedy): `&#123;`, `&#x7b;` (the ";" optional) or a name of up to 32 characters, which
becomes its character if the name (with or without ";") is an HTML5 entity, else its longest
prefix that is one (only the legacy names such as `amp`, `eacute` are defined without ";"),
else stays as it is. Every reference starts with "&" and no reference contains another "&",
so a literal search for "&"-prefixed patterns that always takes the longest pattern starting
at the leftmost position (`str.replace_many(..., leftmost=True)` with patterns sorted longest
first) replaces exactly the same spans, provided the pattern list holds every reference that
occurs:
- the named ones are a fixed table (`html.entities.html5`, 2,231 names);
- the numeric ones are unbounded, so the corpus is scanned for those it holds first (one
  cheap streaming pass over the rows with "&#"), and each distinct one is decoded by
  `html.unescape` itself: windows-1252 remapping of 0x80-0x9F, U+FFFD for surrogates and
  code points past U+10FFFF, and the dropped invalid code points stay exactly Python's.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from html.entities import html5

import polars as pl

# html.unescape's numeric alternatives, greedy like its regex.
NUMERIC_REFERENCE = r"&#(?:[0-9]+|[xX][0-9a-fA-F]+);?"


def numeric_references(lf: pl.LazyFrame, columns: list[str], lists: Iterable[str] = ()) -> set[str]:
    """Every distinct numeric character reference in the string `columns` and in the elements
    of the list columns `lists` of `lf` (a streaming scan; only rows with "&#" are searched)."""
    found: set[str] = set()
    for c in (*columns, *lists):
        text = pl.col(c).explode() if c in lists else pl.col(c)
        refs = (
            lf.select(text.alias("text"))
            .filter(pl.col("text").str.contains("&#", literal=True))
            .select(pl.col("text").str.extract_all(NUMERIC_REFERENCE).explode().unique())
            .collect(engine="streaming")
            .to_series()
        )
        found.update(r for r in refs.to_list() if r is not None)
    return found


def entity_table(numeric: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(patterns, replacements): every named HTML5 reference and the given numeric ones, longest
    first, so a leftmost-first search takes the longest reference at each "&"."""
    table = {f"&{name}": char for name, char in html5.items()}
    table.update((ref, html.unescape(ref)) for ref in numeric)
    patterns = sorted(table, key=len, reverse=True)
    return patterns, [table[p] for p in patterns]


def unescape_html(text: pl.Expr, patterns: list[str], replacements: list[str]) -> pl.Expr:
    """`html.unescape` of every value of `text`, given the table of `entity_table` built with
    every numeric reference the values contain."""
    return text.str.replace_many(patterns, replacements, leftmost=True)
