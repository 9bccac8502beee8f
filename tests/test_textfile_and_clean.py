"""Text preparation and Polars cleaning on small hand-made corpora."""

from __future__ import annotations

import gzip

import polars as pl
import pyarrow.parquet as pq
import pytest

from seqmodels.config import CleanConfig
from seqmodels.data.clean import (
    MONOLINGUAL_SCHEMA,
    PARALLEL_SCHEMA,
    AlignmentError,
    InputFile,
    clean_corpus,
)
from seqmodels.data.clean_report import report_markdown, write_report
from seqmodels.data.textfile import CorruptInputError, prepare_text_file, read_text_stats


def test_prepare_fixes_bom_crlf_nul_and_invalid_utf8_and_counts_each(tmp_path):
    raw = tmp_path / "raw.txt.gz"
    with gzip.open(raw, "wb") as f:
        f.write(b"\xef\xbb\xbfone\r\ntw\x00o\nbad \xff byte\r\nlast line without newline")
    stats = prepare_text_file(raw, tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_bytes() == (
        b"one\ntwo\nbad \xef\xbf\xbd byte\nlast line without newline\n"
    )
    assert (stats.lines, stats.bom_removed, stats.crlf_fixed, stats.nul_removed) == (4, 1, 2, 1)
    assert stats.invalid_utf8_lines == 1


def test_prepare_keeps_only_max_lines(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text("".join(f"line {i}\n" for i in range(100)))
    stats = prepare_text_file(raw, tmp_path / "out.txt", max_lines=7)
    assert stats.lines == 7
    assert (tmp_path / "out.txt").read_text().splitlines() == [f"line {i}" for i in range(7)]


def test_truncated_gzip_is_an_error_naming_the_file_and_leaves_nothing(tmp_path):
    raw = tmp_path / "corpus.txt.gz"
    raw.write_bytes(gzip.compress(b"hello world\n" * 10_000)[:200])
    with pytest.raises(CorruptInputError, match="corpus.txt.gz"):
        prepare_text_file(raw, tmp_path / "out" / "corpus.txt")
    assert not (tmp_path / "out" / "corpus.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_monolingual_split_by_position_and_rules_are_counted(tmp_path):
    lines = [f"Line number {i} of the play." for i in range(80)] + [""] * 10 + ["x" * 50] * 10
    path = _write(tmp_path / "text.txt", lines)
    cfg = CleanConfig(
        max_chars=40, valid_fraction=0.1, test_fraction=0.1, remove_eval_overlap=False
    )
    parquet, report = clean_corpus(
        [InputFile(path, "file:///text.txt")], tmp_path / "out", cfg, "monolingual"
    )

    table = pl.read_parquet(parquet)
    assert pq.read_schema(parquet).names == list(MONOLINGUAL_SCHEMA)
    assert table.schema == pl.Schema(MONOLINGUAL_SCHEMA)
    # Lines 1-80 are train (80% of 100), 81-90 valid (all empty), 91-100 test.
    assert report["rows_in"] == {"train": 80, "valid": 10, "test": 10}
    assert report["dropped"] == {"empty": {"valid": 10}}
    # The 50-char lines are in test: filters do not touch eval splits.
    assert report["rows_out"] == {"train": 80, "valid": 0, "test": 10}
    assert table.filter(pl.col("split") == "test")["line"].to_list() == list(range(91, 101))
    assert table["id"].to_list() == list(range(90))


def test_parallel_rules_dedup_and_eval_overlap(tmp_path):
    src = [
        "Ein Hund läuft.",
        "Ein Hund läuft.",
        "Ja",
        "Eine Frau  liest\tein Buch.",
        "Hallo Welt",
        "Test.",
    ]
    tgt = [
        "A dog runs.",
        "A dog runs.",
        "Yes, this is a much much longer sentence.",
        "A woman reads a book.",
        "Hallo Welt",
        "Test.",
    ]
    files = [
        InputFile(_write(tmp_path / "train.de", src), "u/train.de", "train", "de"),
        InputFile(_write(tmp_path / "train.en", tgt), "u/train.en", "train", "en"),
        InputFile(_write(tmp_path / "test.de", ["Test."]), "u/test.de", "test", "de"),
        InputFile(_write(tmp_path / "test.en", ["Test."]), "u/test.en", "test", "en"),
    ]
    parquet, report = clean_corpus(
        files, tmp_path / "out", CleanConfig(), "parallel", src_lang="de", tgt_lang="en"
    )
    table = pl.read_parquet(parquet)
    assert table.schema == pl.Schema(PARALLEL_SCHEMA)
    assert report["dropped"] == {
        "duplicate": {"train": 1},
        "length_ratio": {"train": 1},
        "identical_src_tgt": {"train": 2},
    }
    train = table.filter(pl.col("split") == "train")
    assert train["src"].to_list() == [
        "Ein Hund läuft.",
        "Eine Frau liest ein Buch.",
    ]  # whitespace collapsed
    assert train["line"].to_list() == [1, 4]
    # The identical test pair stays: eval splits are never filtered by these rules.
    assert table.filter(pl.col("split") == "test")["tgt"].to_list() == ["Test."]
    md = report_markdown(report)
    assert "**duplicate**: 1" in md and "train.de:2" in md
    json_path, md_path = write_report(report, tmp_path / "out")
    assert json_path.exists() and md_path.read_text() == md


def test_misaligned_parallel_files_name_both_files_and_counts(tmp_path):
    files = [
        InputFile(_write(tmp_path / "a.de", ["eins", "zwei"]), "u/a.de", "train", "de"),
        InputFile(_write(tmp_path / "a.en", ["one"]), "u/a.en", "train", "en"),
    ]
    with pytest.raises(AlignmentError, match=r"u/a.de has 2 lines, u/a.en has 1"):
        clean_corpus(
            files, tmp_path / "out", CleanConfig(), "parallel", src_lang="de", tgt_lang="en"
        )
    assert not (tmp_path / "out" / "corpus.parquet").exists()


def test_same_input_gives_the_same_parquet(tmp_path):
    path = _write(tmp_path / "t.txt", [f"sentence {i % 37}" for i in range(500)])
    outputs = []
    for run in ("a", "b"):
        parquet, _ = clean_corpus(
            [InputFile(path, "u/t.txt")], tmp_path / run, CleanConfig(), "monolingual"
        )
        outputs.append(pl.read_parquet(parquet))
    assert outputs[0].equals(outputs[1])


def test_a_file_no_rule_changes_is_linked_not_copied_and_others_are_rewritten(tmp_path):
    clean, dirty = tmp_path / "clean.txt", tmp_path / "dirty.txt"
    clean.write_bytes("Grüße\nzwei\n".encode())
    dirty.write_bytes(b"Gr\xfc\xdfe\r\nzwei\n")  # latin-1 bytes and a CRLF
    stats = prepare_text_file(clean, tmp_path / "out" / "clean.txt")
    assert (
        stats.lines == 2 and (tmp_path / "out" / "clean.txt").stat().st_ino == clean.stat().st_ino
    )
    stats = prepare_text_file(dirty, tmp_path / "out" / "dirty.txt")
    assert stats.crlf_fixed == 1 and stats.invalid_utf8_lines == 1
    assert (tmp_path / "out" / "dirty.txt").read_text() == "Gr\ufffd\ufffde\nzwei\n"
    assert read_text_stats(tmp_path / "out" / "clean.txt").lines == 2


@pytest.mark.parametrize(
    ("content", "linked"),
    [
        ("€uro straße\n" * 3 + "ä" * 9 + "\n", True),  # characters and a line across blocks
        ("ok\n" + "€" * 7, False),  # no final newline
        (b"ok\n\xe2\x82\n", False),  # a cut-off UTF-8 sequence
    ],
)
def test_the_clean_file_check_reads_in_blocks_without_splitting_a_character(
    tmp_path, monkeypatch, content, linked
):
    monkeypatch.setattr("seqmodels.data.textfile.CHUNK", 5)  # 5-byte blocks
    source = tmp_path / "in.txt"
    source.write_bytes(content.encode() if isinstance(content, str) else content)

    prepare_text_file(source, tmp_path / "out.txt")

    assert ((tmp_path / "out.txt").stat().st_ino == source.stat().st_ino) is linked
