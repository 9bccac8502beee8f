"""The cleaning rules are native Polars expressions; entity decoding must equal html.unescape."""

from __future__ import annotations

import html
import random
import re
import unicodedata
from html.entities import html5

import polars as pl

from seqmodels.data.clean import (
    InputFile,
    clean_corpus,
    normalisation_steps,
    normalisation_unstable_class,
)
from seqmodels.data.entities import character_references, entity_table, unescape_html
from seqmodels.data.settings import CleanConfig
from seqmodels.data.textfile import prepare_text_file


def decode(rows: list[str]) -> list[str]:
    lf = pl.LazyFrame({"text": rows})
    patterns, replacements = entity_table(character_references(lf, ["text"]))
    return (
        lf.select(unescape_html(pl.col("text"), patterns, replacements)).collect()["text"].to_list()
    )


def test_every_named_entity_decodes_as_html_unescape_does():
    rows = []
    for name in html5:  # with and without ";", glued to text, twice, inside a longer name
        rows += [f"&{name}", f"x&{name}y", f"&{name}&{name}", f"&{name}abc;", f"&{name} z"]
    assert decode(rows) == [html.unescape(r) for r in rows]


def test_numeric_references_decode_as_html_unescape_does():
    code_points = [*range(0, 300), 0xD800, 0xDFFF, 0xFFFE, 0x10FFFF, 0x110000, 10**20]
    rows = []
    for i in code_points:  # decimal and hex, with and without ";", followed by text
        rows += [f"&#{i};", f"&#{i}", f"&#x{i:x};", f"&#X{i:X}z", f"a&#{i}9b"]
    rows += ["&#", "&#x", "&#;", "&#xg;", "&&#65;&", "&#65;&amp;#66;"]
    assert decode(rows) == [html.unescape(r) for r in rows]


def test_random_entity_soup_decodes_as_html_unescape_does():
    rng = random.Random(20261203)
    names = list(html5)
    pieces = ["&", "&#", "&#x", ";", " ", "\t", "<", "#", "a", "Z", "9", "é", "amp", "&amp"]
    pieces += ["&#128", "&#x80;", "&#xD800;", "&#1114112", "&not", "notin", "ampersand", "&lt"]
    rows = [
        "".join(
            rng.choice(pieces) if rng.random() < 0.7 else "&" + rng.choice(names)
            for _ in range(rng.randint(1, 12))
        )
        for _ in range(5000)
    ]
    assert decode(rows) == [html.unescape(r) for r in rows]


def test_the_entity_table_holds_only_the_references_the_text_can_use():
    # The whole HTML5 table in every replace_many call costs 2.5 ms per morsel; a name is in
    # the table when it starts a "&name" run of the text, a numeric reference when it occurs.
    lf = pl.LazyFrame({"text": ["Fish &amp; chips &eacute;t&#233;", "AT&T; &notin &foo;", None]})
    patterns, replacements = entity_table(character_references(lf, ["text"]))
    table = dict(zip(patterns, replacements, strict=True))
    assert table == {
        "&amp;": "&", "&amp": "&", "&eacute;": "é", "&eacute": "é", "&#233;": "é",
        "&not": "¬",  # "&notin" is not a name without ";", but its prefix "&not" is
    }  # fmt: skip
    assert patterns == sorted(patterns, key=len, reverse=True)  # the longest reference wins
    assert decode(["&notin;x", "&notinx", "no reference"]) == ["∉x", "¬inx", "no reference"]
    nothing = pl.LazyFrame({"text": ["a & b", "&foo; &#", None]})
    assert entity_table(character_references(nothing, ["text"])) == ([], [])
    assert decode(["a & b", "&foo; &#", "&" + "a" * 100_000 + "mp;"]) == [
        "a & b", "&foo; &#", "&" + "a" * 100_000 + "mp;",
    ]  # fmt: skip


def test_clean_corpus_applies_each_rule_and_counts_the_rows_it_changed(tmp_path):
    src = [
        "Fish &amp; chips &eacute;t&#233;",  # entities (a complete one, so all are decoded)
        "caf\u0065\u0301 au lait",  # NFD: NFC composes it
        "bell\x07here",  # control character -> space
        "  many   spaces\t",  # whitespace
        "AT&T stays as it is",  # no complete entity: untouched
    ]
    tgt = ["fish and chips", "coffee with milk", "a bell", "lots of room", "AT and T"]
    inputs = []
    for lang, lines in (("de", src), ("en", tgt)):
        raw = tmp_path / f"train.{lang}"
        raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
        text = tmp_path / "text" / raw.name
        inputs.append(InputFile(text, f"file://{raw}", "train", lang, prepare_text_file(raw, text)))
    cfg = CleanConfig(min_chars=1, min_words=1, max_length_ratio=None, min_letter_fraction=0.0)
    parquet, report = clean_corpus(
        inputs, tmp_path / "clean", cfg, "parallel", src_lang="de", tgt_lang="en"
    )
    assert pl.read_parquet(parquet)["src"].to_list() == [
        "Fish & chips été",
        "café au lait",
        "bell here",
        "many spaces",
        "AT&T stays as it is",
    ]
    changed = {rule: rows["train"] for rule, rows in report["changed_by_normalisation"].items()}
    assert changed == {"html_entities": 1, "unicode_nfc": 1, "control_chars": 1, "whitespace": 1}


def test_text_without_an_unstable_character_is_already_normalised():
    # The normalisation rule only rewrites segments with a character of this class; every
    # other segment must already be in the form, in any script.
    blocks = [(0x20, 0x250), (0x300, 0x370), (0x370, 0x3FF), (0x400, 0x4FF), (0x900, 0x97F)]
    blocks += [(0xB80, 0xBFF), (0x1100, 0x1200), (0xAC00, 0xAC40), (0x1E00, 0x1F00)]
    blocks += [(0x2100, 0x2150), (0xF900, 0xF920), (0xFB00, 0xFB50), (0xFF00, 0xFF60)]
    pool = [chr(i) for a, b in blocks for i in range(a, b)]
    rng = random.Random(7)
    rows = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 8))) for _ in range(20000)]
    for form in ("NFC", "NFKC"):
        unstable = normalisation_unstable_class(form)
        flagged = pl.Series(rows).str.contains(unstable).to_list()
        assert 0 < sum(flagged) < len(rows)
        untouched = [r for r, f in zip(rows, flagged, strict=True) if not f]
        assert all(unicodedata.normalize(form, r) == r for r in untouched), form


def test_whitespace_rule_collapses_every_run_and_strips_the_ends():
    # Every Unicode whitespace character Polars' regex knows, in random runs between words.
    spaces = [chr(c) for c in range(0x3001) if pl.Series([chr(c)]).str.contains(r"^\s$")[0]]
    rng = random.Random(0)
    rows = [
        "".join(
            rng.choice(spaces) * rng.randint(0, 2) + rng.choice(["a", "bc", "é"]) for _ in range(6)
        )
        + rng.choice(["", " ", "\t", "\u3000 "])
        for _ in range(3000)
    ]
    (step,) = [s for s in normalisation_steps(CleanConfig()) if s[0] == "whitespace"]

    out = pl.Series(rows).to_frame("t").select(step[2](pl.col("t"))).to_series().to_list()

    assert len(spaces) >= 20
    assert out == [" ".join(re.split(r"\s+", row.strip(" ".join(spaces)))) for row in rows]


def test_control_character_rule_spaces_cc_and_drops_cf_as_unicodedata_says():
    # Every Cc and Cf character this Python knows, between words: Cc (but tab) becomes a
    # space, Cf goes, but ZWNJ/ZWJ (which Persian and Indic scripts need) stay.
    controls = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) in ("Cc", "Cf")]
    rng = random.Random(1)
    pieces = ["ab", "é", " ", *controls]
    rows = ["".join(rng.choice(pieces) for _ in range(12)) for _ in range(4000)]
    (step,) = [s for s in normalisation_steps(CleanConfig()) if s[0] == "control_chars"]

    out = pl.Series(rows).to_frame("t").select(step[2](pl.col("t"))).to_series().to_list()

    def reference(ch: str) -> str:
        if ch in "\t\u200c\u200d":
            return ch
        return {"Cc": " ", "Cf": ""}.get(unicodedata.category(ch), ch)

    assert len(controls) > 150
    assert set("".join(rows)) >= set(controls)
    assert out == ["".join(reference(ch) for ch in row) for row in rows]
