"""Settings of the data stages (download, clean, vocab): the `corpus`, `clean` and `vocab`
blocks of an experiment in the config, validated before any stage runs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from seqmodels.settings import Settings

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class SourceFile(Settings):
    url: str
    sha256: str | None = None  # missing: downloaded anyway, its digest printed to pin it
    split: Literal["train", "valid", "test"] | None = None  # None: split by clean.split_method
    lang: str | None = None  # parallel text files: which side this file holds
    member: str | None = None  # zip/tar archives: the path of the corpus file inside
    # text: one segment per line. tsv: tab-separated fields, no quoting (first row is the
    # header unless `columns` names them). jsonl: one JSON object per line.
    format: Literal["text", "tsv", "jsonl"] = "text"
    # tsv/jsonl: column or key of each side, {text: ...} or {<src_lang>: ..., <tgt_lang>: ...}
    fields: dict[str, str] = {}
    columns: list[str] | None = None  # tsv without a header row: the column names, in order

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None:
            value = value.lower()
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise ValueError(f"sha256 must be 64 hex digits, got {value!r}")
        return value

    @model_validator(mode="after")
    def _format_fits(self) -> SourceFile:
        is_archive = self.url.lower().endswith(ARCHIVE_SUFFIXES)
        if is_archive and not self.member:
            raise ValueError(f"{self.url} is an archive: name the corpus file in it with `member`")
        if self.member and not is_archive:
            raise ValueError(f"{self.url}: `member` is only for zip/tar archives")
        if self.format == "text" and self.fields:
            raise ValueError(f"{self.url}: `fields` is for tsv/jsonl files")
        if self.format != "text" and not self.fields:
            raise ValueError(f"{self.url}: a {self.format} file needs `fields`")
        if self.columns is not None and self.format != "tsv":
            raise ValueError(f"{self.url}: `columns` is for tsv files")
        if self.columns is not None:
            unknown = [c for c in self.fields.values() if c not in self.columns]
            if unknown:
                raise ValueError(f"{self.url}: fields {unknown} are not in columns {self.columns}")
        return self


class CorpusConfig(Settings):
    kind: Literal["monolingual", "parallel"]
    files: list[SourceFile] = Field(min_length=1)
    src_lang: str | None = None
    tgt_lang: str | None = None
    max_lines: int | None = Field(default=None, gt=0)  # first N lines of every file: quick runs

    @model_validator(mode="after")
    def _sides_are_named(self) -> CorpusConfig:
        if self.kind == "monolingual":
            for f in self.files:
                if f.format != "text" and set(f.fields) != {"text"}:
                    raise ValueError(f"file {f.url}: fields must be {{text: <column>}}")
            return self
        if not self.src_lang or not self.tgt_lang:
            raise ValueError("a parallel corpus needs src_lang and tgt_lang")
        sides = {self.src_lang, self.tgt_lang}
        for f in self.files:
            if f.format == "text" and f.lang not in sides:
                raise ValueError(
                    f"file {f.url}: lang must be {self.src_lang!r} or {self.tgt_lang!r}"
                )
            if f.format != "text" and set(f.fields) != sides:
                raise ValueError(f"file {f.url}: fields must name exactly {sorted(sides)}")
        # Line-aligned text files pair up per split: one file per side.
        for split in {f.split for f in self.files if f.format == "text"}:
            per_lang = [
                [
                    f
                    for f in self.files
                    if f.format == "text" and f.split == split and f.lang == lang
                ]
                for lang in (self.src_lang, self.tgt_lang)
            ]
            if [len(p) for p in per_lang] != [1, 1]:
                raise ValueError(
                    f"split {split or 'unsplit'!r}: aligned text files need exactly one "
                    f"{self.src_lang} and one {self.tgt_lang} file, got {len(per_lang[0])} "
                    f"and {len(per_lang[1])}"
                )
        return self


class CleanConfig(Settings):
    # Normalisation, applied to every split, in this order; each counts the rows it changed.
    unicode_normalization: Literal["NFC", "NFKC"] | None = "NFC"
    unescape_html: bool = True  # &amp; &#39; &eacute; ... become the characters they name
    remove_control_chars: bool = True  # Cc become spaces; Cf (ZWSP, soft hyphen) removed
    normalize_whitespace: bool = True  # runs of whitespace become one space; ends stripped
    # Filters: a row is dropped for the first rule it fails. They apply to `filter_splits`
    # only (train by default): valid/test must stay comparable to published numbers, so they
    # lose only empty (and malformed) rows.
    filter_splits: list[Literal["train", "valid", "test"]] = ["train"]
    min_chars: int = Field(default=1, ge=1)
    max_chars: int = Field(default=1000, ge=1)
    min_words: int = Field(default=1, ge=1)
    max_words: int = Field(default=250, ge=1)
    max_length_ratio: float | None = Field(default=3.0, gt=1.0)  # parallel: longer/shorter side
    min_letter_fraction: float | None = Field(default=0.5, ge=0.0, le=1.0)  # of non-space chars
    drop_identical: bool = True  # parallel: source identical to target (copied, untranslated)
    deduplicate: bool = True  # exact duplicates within a split (the pair, for parallel data)
    remove_eval_overlap: bool = True  # train segments that also occur in valid/test
    # Sources without a split: `position` takes the first lines as train, then valid, then
    # test; `hash` assigns each line by a stable hash of (file, line number, split_seed).
    split_method: Literal["position", "hash"] = "position"
    split_seed: int = Field(default=0, ge=0)
    valid_fraction: float = Field(default=0.05, ge=0.0, lt=0.5)
    test_fraction: float = Field(default=0.05, ge=0.0, lt=0.5)
    on_malformed: Literal["error", "drop"] = "error"  # tsv/jsonl rows without their fields

    @model_validator(mode="after")
    def _bounds_are_ordered(self) -> CleanConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} > max_chars {self.max_chars}")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words {self.min_words} > max_words {self.max_words}")
        return self


class VocabConfig(Settings):
    model_type: Literal["unigram", "bpe"] = "unigram"
    vocab_size: int = Field(default=8000, ge=16)
    character_coverage: float = Field(default=1.0, gt=0.0, le=1.0)
    max_sentences: int = Field(default=2_000_000, gt=0)  # sampled when the corpus is bigger
