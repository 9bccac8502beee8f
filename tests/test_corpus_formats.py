"""Corpus formats (TSV, JSONL, archives), every cleaning rule, and the split methods."""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
import zipfile

import polars as pl
import pytest

from seqmodels.config import CleanConfig, CorpusConfig, SourceFile
from seqmodels.data.archive import UnsafeArchiveError, extract_member
from seqmodels.data.clean import CorpusFormatError, InputFile, clean_corpus
from seqmodels.data.clean_report import report_markdown
from seqmodels.data.corpus_reader import prepare_inputs, scan_text_pair


def _lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_aligned_text_files_are_read_line_for_line_as_polars_reads_lines(tmp_path):
    # Prepared text has no NUL and no CR, but any other byte: quotes, separators, comment
    # marks, empty and very long lines, Unicode line separators, no final newline. (A CR
    # before a newline goes, as scan_lines drops it too.)
    rng = random.Random(11)
    alphabet = ["a", " ", "\t", '"', "'", ",", ";", "#", "é", "\u2028", "\x0b", "\x85", "\\"]
    lines = ["", '"open quote', "#not a comment", "x" * 200_000, "\r inside"]
    lines += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    lines.append("the last line, with no newline after it")
    src, tgt = tmp_path / "train.de", tmp_path / "train.en"
    src.write_text("\n".join(lines), encoding="utf-8", newline="")  # no final newline
    tgt.write_text("\n".join(line[::-1] for line in lines), encoding="utf-8", newline="")
    files = [InputFile(p, f"file://{p}", "train", p.suffix[1:]) for p in (src, tgt)]
    pairs = scan_text_pair(*files).collect()
    assert pairs["src"].to_list() == pl.scan_lines(src).collect()["line"].to_list() == lines
    assert pairs["tgt"].to_list() == pl.scan_lines(tgt).collect()["line"].to_list()
    assert pairs["line"].to_list() == list(range(1, len(lines) + 1))
    # The one difference: a U+FEFF starting the file (a second BOM) goes, where scan_lines kept it.
    src.write_text("\ufeffline one\nline two\n", encoding="utf-8")
    tgt.write_text("\ufeffline one\nline two\n", encoding="utf-8")
    assert scan_text_pair(*files).collect()["src"].to_list() == ["line one", "line two"]


def test_a_nul_byte_in_a_file_the_caller_did_not_prepare_is_named_before_cleaning(tmp_path):
    src = tmp_path / "train.de"
    src.write_bytes(b"Ein Hund.\nEine Katze.\nEin Vogel.\n")
    tgt = tmp_path / "train.en"
    # The NUL past the first 8 MiB read, so the line count spans chunks.
    tgt.write_bytes(b"A dog.\n" * 2_000_000 + b"A c\0at.\nA bird.\n")
    files = [InputFile(p, f"file://{p}", "train", p.suffix[1:]) for p in (src, tgt)]

    with pytest.raises(CorpusFormatError, match=re.escape(f"{tgt}:2000001: NUL byte")):
        clean_corpus(
            files, tmp_path / "out", CleanConfig(), "parallel", src_lang="de", tgt_lang="en"
        )
    assert not (tmp_path / "out").exists()  # refused before any work


def test_parallel_tsv_with_header_reads_named_columns(tmp_path):
    path = _lines(
        tmp_path / "pairs.tsv",
        ["id\ten\tde", "1\tA dog runs.\tEin Hund läuft.", "2\tA cat sleeps.\tEine Katze schläft."],
    )
    file = InputFile(path, "u/pairs.tsv", "train", format="tsv", fields={"de": "de", "en": "en"})
    parquet, report = clean_corpus(
        [file], tmp_path / "out", CleanConfig(), "parallel", src_lang="de", tgt_lang="en"
    )
    table = pl.read_parquet(parquet)
    assert table["src"].to_list() == ["Ein Hund läuft.", "Eine Katze schläft."]
    assert table["tgt"].to_list() == ["A dog runs.", "A cat sleeps."]
    assert table["line"].to_list() == [2, 3]  # line numbers of the file, header is line 1


def test_tsv_row_with_missing_field_is_an_error_naming_file_and_line(tmp_path):
    path = _lines(tmp_path / "p.tsv", ["Ein Hund.\tA dog.", "nur eine Spalte", "Ja.\tYes."])
    file = InputFile(
        path,
        "u/p.tsv",
        "train",
        format="tsv",
        fields={"de": "de", "en": "en"},
        columns=["de", "en"],
    )
    with pytest.raises(CorpusFormatError, match=r"u/p.tsv line 2: 'nur eine Spalte'"):
        clean_corpus(
            [file], tmp_path / "out", CleanConfig(), "parallel", src_lang="de", tgt_lang="en"
        )
    assert not (tmp_path / "out" / "corpus.parquet").exists()
    assert list((tmp_path / "out").iterdir()) == []

    # With on_malformed: drop the row is counted and shown instead.
    cfg = CleanConfig(on_malformed="drop")
    _, report = clean_corpus(
        [file], tmp_path / "out", cfg, "parallel", src_lang="de", tgt_lang="en"
    )
    assert report["dropped"]["malformed"] == {"train": 1}
    assert report["rows_out"]["train"] == 2


def test_jsonl_monolingual_reads_the_named_key_and_reports_bad_lines(tmp_path):
    rows = [
        json.dumps({"text": "Erste Zeile mit \u00e9", "meta": 1}),
        "",
        "{not json",
        json.dumps({"other": "x"}),
        json.dumps({"text": "Zweite Zeile"}),
    ]
    path = _lines(tmp_path / "c.jsonl", rows)
    file = InputFile(path, "u/c.jsonl", "train", format="jsonl", fields={"text": "text"})
    with pytest.raises(CorpusFormatError, match=r"2 malformed row.*u/c.jsonl line 3.*line 4"):
        clean_corpus([file], tmp_path / "out", CleanConfig(), "monolingual")
    cfg = CleanConfig(on_malformed="drop")
    parquet, report = clean_corpus([file], tmp_path / "out", cfg, "monolingual")
    assert pl.read_parquet(parquet)["text"].to_list() == ["Erste Zeile mit é", "Zweite Zeile"]
    assert report["dropped"] == {"malformed": {"train": 2}, "empty": {"train": 1}}


def test_each_normalisation_rule_is_applied_and_counted(tmp_path):
    lines = [
        "Fish &amp; chips &eacute;t&#233;",  # html entities
        "Cafe\u0301 ist offen",  # e + combining accent: NFC composes it
        "Null\x07Byte und\u200b Breite",  # a control char and a zero-width space
        "  viel   Platz\t hier ",  # whitespace
        "Schon sauber",
    ]
    path = _lines(tmp_path / "t.txt", lines)
    cfg = CleanConfig(valid_fraction=0.0, test_fraction=0.0)
    parquet, report = clean_corpus([InputFile(path, "u/t.txt")], tmp_path / "o", cfg, "monolingual")
    assert pl.read_parquet(parquet)["text"].to_list() == [
        "Fish & chips été",
        "Café ist offen",
        "Null Byte und Breite",
        "viel Platz hier",
        "Schon sauber",
    ]
    assert report["changed_by_normalisation"] == {
        "html_entities": {"train": 1},
        "unicode_nfc": {"train": 1},
        "control_chars": {"train": 1},
        "whitespace": {"train": 1},
    }
    assert "**whitespace**: train: 1" in report_markdown(report)


def test_nfkc_folds_compatibility_characters(tmp_path):
    path = _lines(tmp_path / "t.txt", ["ﬁnal ２０２４ Ⅻ"])
    cfg = CleanConfig(unicode_normalization="NFKC", valid_fraction=0, test_fraction=0)
    parquet, _ = clean_corpus([InputFile(path, "u/t.txt")], tmp_path / "o", cfg, "monolingual")
    assert pl.read_parquet(parquet)["text"].to_list() == ["final 2024 XII"]


def test_each_filter_rule_is_counted_with_examples(tmp_path):
    src = [
        "Ein ganz normaler Satz.",
        "Kurz",
        "Ein Satz mit vielen Wörtern hier drin",
        "12345 678 -- 99!",
        "Gleich",
        "Zu lang " + "x" * 60,
        "Ein Hund.",
    ]
    tgt = [
        "A perfectly normal sentence.",
        "Short and also a bit longer than that",
        "A sentence",
        "12345 678 -- 99!",
        "Gleich",
        "Too long",
        "A dog.",
    ]
    files = [
        InputFile(_lines(tmp_path / "s.de", src), "u/s.de", "train", "de"),
        InputFile(_lines(tmp_path / "s.en", tgt), "u/s.en", "train", "en"),
    ]
    cfg = CleanConfig(min_words=2, max_words=6, max_chars=50, max_length_ratio=3.0)
    parquet, report = clean_corpus(
        files, tmp_path / "out", cfg, "parallel", src_lang="de", tgt_lang="en"
    )
    assert report["dropped"] == {
        "too_few_words": {"train": 2},  # "Kurz" (before the length ratio) and "Gleich"
        "too_many_words": {"train": 1},
        "too_many_chars": {"train": 1},
        "mostly_non_letters": {"train": 1},  # before identical_src_tgt
    }
    assert report["examples"]["too_many_chars"][0]["line"] == 6
    assert pl.read_parquet(parquet)["line"].to_list() == [1, 7]


def test_length_ratio_and_identical_sides(tmp_path):
    files = [
        InputFile(
            _lines(tmp_path / "s.de", ["Ja", "Hallo Welt", "Ein Hund."]), "u/s.de", "train", "de"
        ),
        InputFile(
            _lines(tmp_path / "s.en", ["Yes, this is far too long", "Hallo Welt", "A dog."]),
            "u/s.en",
            "train",
            "en",
        ),
    ]
    _, report = clean_corpus(
        files, tmp_path / "out", CleanConfig(), "parallel", src_lang="de", tgt_lang="en"
    )
    assert report["dropped"] == {"length_ratio": {"train": 1}, "identical_src_tgt": {"train": 1}}


def test_filters_can_cover_eval_splits_too(tmp_path):
    lines = ["Guter Satz eins."] * 2 + ["%%% 111 ###"] * 2
    path = _lines(tmp_path / "t.txt", lines)
    common = dict(valid_fraction=0.25, test_fraction=0.25, remove_eval_overlap=False)
    _, report = clean_corpus(
        [InputFile(path, "u/t.txt")], tmp_path / "a", CleanConfig(**common), "monolingual"
    )
    # Lines 1-2 train (one duplicate dropped), 3 valid, 4 test: eval splits are not filtered.
    assert report["rows_out"] == {"train": 1, "valid": 1, "test": 1}
    cfg = CleanConfig(filter_splits=["train", "valid", "test"], **common)
    _, report = clean_corpus([InputFile(path, "u/t.txt")], tmp_path / "b", cfg, "monolingual")
    assert report["dropped"]["mostly_non_letters"] == {"valid": 1, "test": 1}


def test_hash_split_is_stable_proportional_and_seeded(tmp_path):
    path = _lines(tmp_path / "t.txt", [f"Satz Nummer {i} im Korpus" for i in range(4000)])
    cfg = CleanConfig(split_method="hash", valid_fraction=0.1, test_fraction=0.2)
    splits = []
    for run, seed in (("a", 0), ("b", 0), ("c", 7)):
        cfg.split_seed = seed
        parquet, report = clean_corpus(
            [InputFile(path, "u/t.txt")], tmp_path / run, cfg, "monolingual"
        )
        splits.append(pl.read_parquet(parquet).sort("line")["split"].to_list())
    assert splits[0] == splits[1]  # same config, same split
    assert splits[0] != splits[2]  # another seed, another split
    counts = {s: splits[0].count(s) for s in ("train", "valid", "test")}
    assert abs(counts["valid"] - 400) < 80 and abs(counts["test"] - 800) < 100
    # Interleaved, not blocks: the hash does not follow file position.
    assert "test" in splits[0][:200] and "train" in splits[0][-200:]


def _zip(path, members: dict[str, bytes], symlink: str | None = None):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return path


def _tar(path, members: dict[str, bytes], symlink: str | None = None):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(info)
    return path


@pytest.mark.parametrize("make", [_zip, _tar], ids=["zip", "tar.gz"])
def test_archive_member_is_extracted(tmp_path, make):
    archive = make(
        tmp_path / f"c.{'zip' if make is _zip else 'tar.gz'}", {"data/train.txt": b"a\nb\n"}
    )
    out = extract_member(archive, "data/train.txt", tmp_path / "x" / "train.txt")
    assert out.read_bytes() == b"a\nb\n"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        extract_member(archive, "nope.txt", tmp_path / "x" / "nope.txt")


@pytest.mark.parametrize("make", [_zip, _tar], ids=["zip", "tar.gz"])
@pytest.mark.parametrize("bad", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt", "link"])
def test_archive_member_escaping_the_folder_is_refused(tmp_path, make, bad):
    members = {"train.txt": b"ok\n"}
    archive = tmp_path / ("c.zip" if make is _zip else "c.tar.gz")
    if bad == "link":
        make(archive, members, symlink="train-link.txt")
    else:
        make(archive, {**members, bad: b"pwned\n"})
    with pytest.raises(UnsafeArchiveError, match="escapes|is a link"):
        extract_member(archive, "train.txt", tmp_path / "x" / "train.txt")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    assert not (tmp_path.parent / "evil.txt").exists()


def test_prepare_inputs_reads_a_gzipped_member_of_a_tar_archive(tmp_path):
    import gzip

    (tmp_path / "cache" / "0123abcd").mkdir(parents=True)
    archive = _tar(
        tmp_path / "cache" / "0123abcd" / "corpus.tar.gz",
        {"corpus/train.de.gz": gzip.compress(b"Hallo\r\nWelt\n")},
    )
    corpus = CorpusConfig(
        kind="monolingual",
        files=[SourceFile(url="https://h/corpus.tar.gz", member="corpus/train.de.gz")],
    )
    (inputs,) = prepare_inputs([archive], corpus, tmp_path / "work")
    assert inputs.path.read_text() == "Hallo\nWelt\n"
    assert inputs.stats.crlf_fixed == 1


def test_config_refuses_inconsistent_sources():
    with pytest.raises(ValueError, match="archive: name the corpus file"):
        SourceFile(url="https://h/c.zip")
    with pytest.raises(ValueError, match="needs `fields`"):
        SourceFile(url="https://h/c.tsv", format="tsv")
    with pytest.raises(ValueError, match="fields must name exactly"):
        CorpusConfig(
            kind="parallel",
            src_lang="de",
            tgt_lang="en",
            files=[SourceFile(url="https://h/c.jsonl", format="jsonl", fields={"de": "de"})],
        )
    with pytest.raises(ValueError, match="exactly one de and one en file, got 1 and 0"):
        CorpusConfig(
            kind="parallel",
            src_lang="de",
            tgt_lang="en",
            files=[SourceFile(url="https://h/train.de", lang="de", split="train")],
        )
