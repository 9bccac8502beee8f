"""What a new corpus version brings: files, rows and lengths of the new train rows against
the older ones, and how much of the new text the vocabulary in use cannot spell."""

from __future__ import annotations

from hashlib import sha256

import polars as pl

from seqmodels.data.corpus_changes import corpus_update_markdown, describe_corpus_update
from seqmodels.data.settings import VocabConfig
from seqmodels.data.sources import CorpusVersion, VersionFile
from seqmodels.data.vocab import train_sentencepiece

OLD, NEW, TEST = "file:///in/part-1.tsv", "file:///in/part-2.tsv", "file:///test.tsv"


def _parquet(tmp_path):
    """A cleaned corpus: 40 short train rows from part-1, 10 long ones from part-2 (with
    letters part-1 never had), 5 test rows."""
    rows = [("train", OLD, f"the cat sat on mat {i}") for i in range(40)]
    rows += [("train", NEW, f"zebra quokka xylophone jazz {i} " * 3) for i in range(10)]
    rows += [("test", TEST, f"a test line {i}") for i in range(5)]
    split, source, text = zip(*rows, strict=True)
    path = tmp_path / "corpus.parquet"
    pl.DataFrame({"split": split, "source_file": source, "text": text}).write_parquet(path)
    return path


def _version(*urls: str) -> CorpusVersion:
    files = [VersionFile(url, 100, sha256(url.encode()).hexdigest()) for url in urls]
    return CorpusVersion.of(files)


def test_new_rows_are_counted_and_compared_with_the_older_ones(tmp_path):
    parquet = _parquet(tmp_path)
    now, before = _version(OLD, NEW, TEST), _version(OLD, TEST)
    update = describe_corpus_update(parquet, now, before, ["text"])
    assert update["files_added"] == [NEW] and update["files_removed"] == []
    assert update["rows_added"] == 10  # train rows of the new file only
    text = update["columns"]["text"]
    assert text["new"]["rows"] == 10 and text["older"]["rows"] == 40  # test rows not counted
    assert text["new"]["mean_chars"] > 3 * text["older"]["mean_chars"]  # longer rows came in
    assert "new_unknown_piece_rate" not in text  # no vocabulary given


def test_the_unknown_piece_rate_shows_text_the_old_vocabulary_cannot_spell(tmp_path):
    parquet = _parquet(tmp_path)
    # The vocabulary of the previous version, learnt from part-1's rows only.
    old = tmp_path / "old.parquet"
    pl.read_parquet(parquet).filter(pl.col("source_file") == OLD).write_parquet(old)
    vocab = train_sentencepiece(old, ["text"], tmp_path / "spm", VocabConfig(vocab_size=30))
    update = describe_corpus_update(
        parquet, _version(OLD, NEW, TEST), _version(OLD, TEST), ["text"], vocab
    )
    assert update["columns"]["text"]["new_unknown_piece_rate"] > 0.2  # z, q, x, y, j unseen


def test_the_first_version_has_everything_new_and_reads_as_markdown(tmp_path):
    update = describe_corpus_update(_parquet(tmp_path), _version(OLD, NEW, TEST), None, ["text"])
    assert update["previous_corpus_version"] is None and update["rows_added"] == 50
    markdown = corpus_update_markdown(update)
    assert "(previous: none (first version))" in markdown
    assert "| text | 50 new, 0 older |" in markdown
    assert f"- added: `{NEW}`" in markdown
