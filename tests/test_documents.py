"""Summarisation corpora shaped as one document per archive member (AESLC), and corpora read
by a user's Python function (format reader), from config to cleaned Parquet."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import uuid
import zipfile
from pathlib import Path

import polars as pl
import pytest
from pydantic import ValidationError

from seqmodels.data.clean import CorpusFormatError, clean_corpus, corpus_schema
from seqmodels.data.clean_report import report_markdown
from seqmodels.data.corpus_reader import prepare_inputs
from seqmodels.data.documents import DocumentLayoutError, ReaderError
from seqmodels.data.settings import CleanConfig, CorpusConfig, DocumentLayout, SourceFile
from seqmodels.data.splits import read_split

AESLC_COMMIT = "7afc087a1cc234d07121f0d4a2d87102ddceabc2"
AESLC_URL = f"https://github.com/ryanzhumich/AESLC/archive/{AESLC_COMMIT}.zip"
AESLC_SHA256 = "d5d8f1de73cb2b352da0890bac3c824dbb3fdc8b689feffa9fb8f447b8968f98"
AESLC_LAYOUT = DocumentLayout(
    members="*/enron_subject_line/{split}/*.subject",
    splits={"train": "train", "dev": "valid", "test": "test"},
    marker="@",
    source="body",
    target="subject",
    references=["ann0", "ann1", "ann2"],
)
# Summaries are much shorter than their documents and emails can be long: the translation
# filters on length ratio and size would drop most of the training set.
SUMMARY_CLEAN = CleanConfig(max_length_ratio=None, max_chars=20_000, max_words=5_000)


def email(body: str, subject: str | None, refs: tuple[str, ...] = ()) -> bytes:
    """One AESLC member: body, blank line, `@subject` and its line, then `@annN` sections."""
    text = body + "\n\n"
    if subject is not None:
        text += f"@subject\n{subject}\n"
    for i, ref in enumerate(refs):
        text += f"\n@ann{i}\n{ref}\n"
    return text.encode()


def tiny_aeslc() -> dict[str, bytes]:
    root = "AESLC-abc/enron_subject_line"
    refs = ("lunch on friday", "Lunch  &amp; plans", "friday lunch")
    return {
        "AESLC-abc/README.md": b"# not a document\n",
        f"{root}/train/a_1.subject": email(
            "Hi all,\n\nthe meeting moves to Room 5.\n@john will call.", "Meeting moved"
        ),
        f"{root}/train/b_2.subject": email("Please send the report by noon.", "Report due"),
        f"{root}/dev/c_3.subject": email("Can we meet for lunch on Friday?", "Lunch", refs),
        f"{root}/test/d_4.subject": email("The server is down again.", "Outage", refs),
        f"{root}/test/e_5.subject": email("Your invoice is attached.", "Invoice", refs),
    }


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def cached(tmp_path: Path, name: str) -> Path:
    """Where the download stage would have put a file: cache/<sha256>/<name>."""
    folder = tmp_path / "cache" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    return folder / name


def aeslc_corpus(url: str, max_lines: int | None = None) -> CorpusConfig:
    source = SourceFile(url=url, format="documents", documents=AESLC_LAYOUT)
    return CorpusConfig(
        kind="parallel", files=[source], src_lang="en", tgt_lang="en", max_lines=max_lines
    )


@pytest.mark.parametrize("suffix", ["zip", "tar.gz"])
def test_documents_archive_becomes_summaries_with_references(tmp_path, suffix):
    write = write_zip if suffix == "zip" else write_tar
    archive = write(cached(tmp_path, f"aeslc.{suffix}"), tiny_aeslc())
    corpus = aeslc_corpus(f"https://h/aeslc.{suffix}")

    inputs = prepare_inputs([archive], corpus, tmp_path / "work")
    assert [(f.split, f.format, f.stats.lines) for f in inputs] == [
        ("train", "jsonl", 2),
        ("valid", "jsonl", 1),
        ("test", "jsonl", 2),
    ]
    first = json.loads(inputs[0].path.read_text().splitlines()[0])
    assert first["member"] == "AESLC-abc/enron_subject_line/train/a_1.subject"

    parquet, report = clean_corpus(
        inputs, tmp_path / "clean", SUMMARY_CLEAN, "parallel", src_lang="en", tgt_lang="en"
    )
    table = pl.read_parquet(parquet)
    assert table.schema == pl.Schema(corpus_schema("parallel", references=True))
    assert table.columns[:5] == ["id", "split", "src", "tgt", "refs"]
    assert report["rows_out"] == {"train": 2, "valid": 1, "test": 2}
    # The body keeps its blank lines and a line like "@john" (not a section of the layout);
    # normalisation then joins it into one line, like every segment.
    assert table["src"][0] == "Hi all, the meeting moves to Room 5. @john will call."
    assert table["tgt"].to_list() == ["Meeting moved", "Report due", "Lunch", "Outage", "Invoice"]

    test = read_split(parquet, "test", ["src", "tgt", "refs"])
    assert test["tgt"] == ["Outage", "Invoice"]
    # References get the same normalisation as src/tgt; training rows have none.
    assert test["refs"][0] == ["lunch on friday", "Lunch & plans", "friday lunch"]
    assert read_split(parquet, "train", ["refs"])["refs"] == [[], []]
    assert report["changed_by_normalisation"]["html_entities"] == {"valid": 1, "test": 2}


def test_max_lines_takes_the_first_documents_of_each_split_and_prepared_files_are_reused(
    tmp_path,
):
    archive = write_zip(cached(tmp_path, "aeslc.zip"), tiny_aeslc())
    inputs = prepare_inputs([archive], aeslc_corpus("https://h/aeslc.zip", 1), tmp_path / "w")
    assert [(f.split, f.stats.lines) for f in inputs] == [("train", 1), ("valid", 1), ("test", 1)]
    rows = [json.loads(f.path.read_text()) for f in inputs]
    assert [r["member"].rsplit("/", 1)[1] for r in rows] == [
        "a_1.subject",
        "c_3.subject",
        "d_4.subject",
    ]

    # A second run (or another experiment on the same archive) reads the prepared files: the
    # archive itself is not opened again.
    archive.unlink()
    again = prepare_inputs([archive], aeslc_corpus("https://h/aeslc.zip", 1), tmp_path / "w")
    assert [(f.path, f.stats) for f in again] == [(f.path, f.stats) for f in inputs]


def test_a_layout_split_without_members_is_an_error(tmp_path):
    members = {k: v for k, v in tiny_aeslc().items() if "/dev/" not in k}
    archive = write_zip(cached(tmp_path, "aeslc.zip"), members)
    with pytest.raises(DocumentLayoutError, match=r"split folder\(s\) \['dev'\]"):
        prepare_inputs([archive], aeslc_corpus("https://h/aeslc.zip"), tmp_path / "work")


def test_a_document_without_its_subject_is_malformed(tmp_path):
    members = tiny_aeslc()
    bad = "AESLC-abc/enron_subject_line/train/b_2.subject"
    members[bad] = email("Forgot the subject line.", None)
    archive = write_zip(cached(tmp_path, "aeslc.zip"), members)
    url = "https://h/aeslc.zip"
    inputs = prepare_inputs([archive], aeslc_corpus(url), tmp_path / "work")

    # The error names the archive and the member, and says what is missing.
    with pytest.raises(CorpusFormatError, match=rf"{url} member {bad}: no @subject section"):
        clean_corpus(
            inputs, tmp_path / "a", SUMMARY_CLEAN, "parallel", src_lang="en", tgt_lang="en"
        )

    drop = SUMMARY_CLEAN.model_copy(update={"on_malformed": "drop"})
    parquet, report = clean_corpus(
        inputs, tmp_path / "b", drop, "parallel", src_lang="en", tgt_lang="en"
    )
    assert report["dropped"] == {"malformed": {"train": 1}}
    assert f"member {bad}: no @subject section" in report_markdown(report)
    assert report["rows_out"] == {"train": 1, "valid": 1, "test": 2}
    assert pl.read_parquet(parquet)["tgt"].to_list() == [
        "Meeting moved",
        "Lunch",
        "Outage",
        "Invoice",
    ]


# The corpus mirror (see conftest.py) holds it as HOST/PATH of its URL.
MIRROR = Path(
    os.environ.get("SEQMODELS_TEST_MIRROR", Path(__file__).resolve().parents[2] / "shared/corpora")
)


def test_documents_without_split_folders_are_split_by_the_cleaner(tmp_path):
    layout = DocumentLayout(members="**/*.subject", target="subject")
    source = SourceFile(url="https://h/mail.tar.gz", format="documents", documents=layout)
    corpus = CorpusConfig(kind="parallel", files=[source], src_lang="en", tgt_lang="en")
    members = {
        f"mail/{i:02d}.subject": email(f"Body number {i}.", f"Subject {i}") for i in range(20)
    }
    archive = write_tar(cached(tmp_path, "mail.tar.gz"), members)
    (prepared,) = prepare_inputs([archive], corpus, tmp_path / "work")
    assert (prepared.split, prepared.stats.lines) == (None, 20)
    cfg = SUMMARY_CLEAN.model_copy(update={"valid_fraction": 0.1, "test_fraction": 0.1})
    _, report = clean_corpus(
        [prepared], tmp_path / "clean", cfg, "parallel", src_lang="en", tgt_lang="en"
    )
    assert report["rows_out"] == {"train": 16, "valid": 2, "test": 2}
    assert "refs" not in pl.read_parquet(tmp_path / "clean" / "corpus.parquet").columns


AESLC_ARCHIVE = MIRROR / AESLC_URL.removeprefix("https://")


@pytest.mark.skipif(not AESLC_ARCHIVE.exists(), reason="AESLC archive not in the corpus mirror")
def test_real_aeslc_archive(tmp_path):
    raw = cached(tmp_path, AESLC_ARCHIVE.name)
    raw.symlink_to(AESLC_ARCHIVE)
    source = SourceFile(
        url=AESLC_URL, sha256=AESLC_SHA256, format="documents", documents=AESLC_LAYOUT
    )
    corpus = CorpusConfig(kind="parallel", files=[source], src_lang="en", tgt_lang="en")

    # The default size filters (1000 characters) apply to training only.
    clean = CleanConfig(max_length_ratio=None)
    started = time.perf_counter()
    inputs = prepare_inputs([raw], corpus, tmp_path / "work")
    prepared = time.perf_counter()
    parquet, report = clean_corpus(
        inputs, tmp_path / "clean", clean, "parallel", src_lang="en", tgt_lang="en"
    )
    cleaned = time.perf_counter() - prepared
    print(f"\nAESLC: prepare {prepared - started:.2f} s, clean {cleaned:.2f} s")
    print(f"AESLC: rows out {report['rows_out']}, dropped {report['dropped']}")

    assert {f.split: f.stats.lines for f in inputs} == {"train": 14436, "valid": 1960, "test": 1906}
    # Test examples are never filtered: all of them reach the Parquet, each with 3 references.
    assert report["rows_out"]["test"] == 1906
    test = read_split(parquet, "test", ["src", "tgt", "refs"])
    assert all(len(refs) == 3 for refs in test["refs"])
    longest = max(
        (json.loads(line) for line in inputs[2].path.read_text().splitlines()),
        key=lambda row: len(row["src"]),
    )
    assert len(longest["src"]) > clean.max_chars  # a training row this long would be dropped
    assert " ".join(longest["src"].split()) in test["src"]


def reader_module(tmp_path: Path, monkeypatch, code: str) -> str:
    """Write `code` as a fresh module on sys.path; returns its name (fresh: no stale import)."""
    name = f"corpus_rows_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


READER = '''
import json

def read(path, source):
    """One JSON object per line: {"article": ..., "highlights": ..., "split": ...}."""
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            out = {"split": row["split"], "src": row["article"], "tgt": row["highlights"]}
            if "more" in row:
                out["refs"] = row["more"]
            yield out
'''


def reader_input(tmp_path: Path, rows: list[dict]) -> Path:
    raw = cached(tmp_path, "news.jsonl")
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return raw


def reader_corpus(reader: str, **extra) -> CorpusConfig:
    source = SourceFile(url="https://h/news.jsonl", format="reader", reader=reader, **extra)
    return CorpusConfig(kind="parallel", files=[source], src_lang="en", tgt_lang="en")


def test_reader_rows_become_the_corpus(tmp_path, monkeypatch):
    module = reader_module(tmp_path, monkeypatch, READER)
    raw = reader_input(
        tmp_path,
        [
            {"split": "train", "article": "Rain is expected all week.", "highlights": "Rain"},
            {"split": "train", "article": "Markets rose sharply today.", "highlights": "Up"},
            {"split": "test", "article": "A new bridge opened.", "highlights": "Bridge",
             "more": ["New  bridge", "Bridge opens"]},
        ],
    )  # fmt: skip
    inputs = prepare_inputs([raw], reader_corpus(f"{module}:read"), tmp_path / "work")
    parquet, _ = clean_corpus(
        inputs, tmp_path / "clean", SUMMARY_CLEAN, "parallel", src_lang="en", tgt_lang="en"
    )
    assert read_split(parquet, "test", ["src", "tgt", "refs"]) == {
        "src": ["A new bridge opened."],
        "tgt": ["Bridge"],
        "refs": [["New bridge", "Bridge opens"]],
    }
    assert read_split(parquet, "train", ["tgt", "refs"]) == {
        "tgt": ["Rain", "Up"],
        "refs": [[], []],
    }


def test_reader_without_references_keeps_the_plain_parallel_schema(tmp_path, monkeypatch):
    module = reader_module(tmp_path, monkeypatch, READER)
    raw = reader_input(tmp_path, [{"split": "train", "article": "Sun.", "highlights": "Sun"}])
    inputs = prepare_inputs([raw], reader_corpus(f"{module}:read"), tmp_path / "work")
    parquet, _ = clean_corpus(
        inputs, tmp_path / "clean", SUMMARY_CLEAN, "parallel", src_lang="en", tgt_lang="en"
    )
    assert pl.read_parquet(parquet).schema == pl.Schema(corpus_schema("parallel"))


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"split": "train", "src": 3, "tgt": "t"}, r"field 'src' must be a string"),
        ({"split": "train", "src": "s", "tgt": "t", "summary": "x"}, r"unknown field.*'summary'"),
        ({"split": "dev", "src": "s", "tgt": "t"}, r"field 'split' must be one of"),
        ({"split": "test", "src": "s", "tgt": "t", "refs": "one"}, r"field 'refs' must be a list"),
        (
            {"split": "test", "src": "s", "tgt": "t", "refs": ["a", "b", "c"]},
            r"field 'refs' has 3 references, more than max",
        ),
        ("just a string", r"a row must be a dict"),
    ],
)
def test_a_reader_row_outside_the_schema_is_an_error_naming_reader_and_row(
    tmp_path, monkeypatch, bad_row, message
):
    rows = [{"split": "train", "src": "Fine.", "tgt": "ok"}, bad_row]
    module = reader_module(tmp_path, monkeypatch, f"def read(path, source):\n    return {rows!r}\n")
    corpus = reader_corpus(f"{module}:read", max_references=2)
    with pytest.raises(ReaderError, match=rf"reader '{module}:read', row 2: {message}"):
        prepare_inputs([reader_input(tmp_path, [])], corpus, tmp_path / "work")
    assert not list((tmp_path / "work").rglob("*.jsonl"))  # nothing half-prepared is left


def test_a_reader_row_without_a_target_is_malformed(tmp_path, monkeypatch):
    rows = [{"split": "train", "src": "Fine.", "tgt": "ok"}, {"split": "train", "src": "Lost."}]
    module = reader_module(tmp_path, monkeypatch, f"def read(path, source):\n    return {rows!r}\n")
    inputs = prepare_inputs(
        [reader_input(tmp_path, [])], reader_corpus(f"{module}:read"), tmp_path / "work"
    )
    with pytest.raises(CorpusFormatError, match=r"https://h/news.jsonl member row 2: no tgt"):
        clean_corpus(
            inputs, tmp_path / "clean", SUMMARY_CLEAN, "parallel", src_lang="en", tgt_lang="en"
        )


def test_a_reader_that_cannot_be_found_is_a_clear_error(tmp_path, monkeypatch):
    raw = reader_input(tmp_path, [])
    with pytest.raises(ReaderError, match=r"reader 'no_such_module:read': cannot import module"):
        prepare_inputs([raw], reader_corpus("no_such_module:read"), tmp_path / "work")
    module = reader_module(tmp_path, monkeypatch, "def other(path, source):\n    return []\n")
    with pytest.raises(ReaderError, match=rf"module '{module}' has no function 'read'"):
        prepare_inputs([raw], reader_corpus(f"{module}:read"), tmp_path / "work")


def test_config_names_the_field_that_is_missing_or_out_of_place():
    with pytest.raises(ValidationError, match=r"documents\n.*needs a `documents:` block"):
        SourceFile(url="https://h/aeslc.zip", format="documents")
    with pytest.raises(ValidationError, match=r"reader\n.*needs `reader: package.module"):
        SourceFile(url="https://h/rows.jsonl", format="reader")
    with pytest.raises(ValidationError, match=r"`fields` is for tsv/jsonl files, not documents"):
        SourceFile(
            url="https://h/aeslc.zip", format="documents", documents=AESLC_LAYOUT, fields={"a": "b"}
        )
    with pytest.raises(ValidationError, match=r"documents\n.*is for format documents"):
        SourceFile(url="https://h/c.txt", lang="en", documents=AESLC_LAYOUT)
    with pytest.raises(ValidationError, match=r"map its folders with `splits`"):
        DocumentLayout(members="*/{split}/*.subject", target="subject")
    with pytest.raises(ValidationError, match=r"`max_references` is for format reader"):
        SourceFile(
            url="https://h/a.zip", format="documents", documents=AESLC_LAYOUT, max_references=2
        )
    # A dumped config (the resolved config.json of a run) validates again.
    corpus = aeslc_corpus("https://h/aeslc.zip")
    assert CorpusConfig.model_validate(corpus.model_dump(mode="json")) == corpus
    # One language on both sides only works when the files name their sides by role.
    with pytest.raises(ValidationError, match=r"src_lang and tgt_lang are both 'en'"):
        CorpusConfig(
            kind="parallel",
            src_lang="en",
            tgt_lang="en",
            files=[SourceFile(url="https://h/p.tsv", format="tsv", fields={"en": "en"})],
        )
