"""Settings of the data stages (download, clean, vocab): the `corpus`, `clean` and `vocab`
blocks of an experiment in the config, validated before any stage runs."""

from __future__ import annotations

import urllib.parse
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from seqmodels.settings import Settings

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
LINE_FORMATS = ("text", "tsv", "jsonl")  # one segment (or pair) per line of one file
PAIR_FORMATS = ("documents", "reader")  # (src, tgt) pairs without language keys: need no fields
SPLIT_PLACEHOLDER = "{split}"
DEFAULT_MAX_REFERENCES = 4
GLOB_CHARS = "*?["
# Object stores read through fsspec (the s3fs/gcsfs/adlfs backends are optional extras).
FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
LISTABLE_SCHEMES = ("file", *FSSPEC_SCHEMES)  # http(s) has no listing: use a manifest there
DEFAULT_SETTLE_SECONDS = 60.0


def listing_kind(url: str, manifest: bool) -> Literal["manifest", "glob", "prefix"] | None:
    """How a corpus entry names its files: None for one pinned file, else how it is listed.

    A glob (`*`, `?`, `[` in the path) or a folder prefix (ending in `/`) is listed on its
    filesystem; http(s) URLs are never listed (`?` starts their query), only read as manifests.
    """
    if manifest:
        return "manifest"
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in LISTABLE_SCHEMES:
        return None
    if any(c in parsed.path for c in GLOB_CHARS):
        return "glob"
    return "prefix" if parsed.path.endswith("/") else None


class DocumentLayout(Settings):
    """An archive of one document per member, each split into sections by marker lines.

    AESLC: `<body>\n\n@subject\n<subject>\n\n@ann0\n<reference>...`: a line that is exactly
    `marker + name` starts section `name`; the text before the first marker is `body`.
    """

    # Glob of member paths (`*` and `?` stay within one folder, `**` crosses folders);
    # `{split}` matches one folder name, looked up in `splits`.
    members: str = Field(min_length=1)
    # Folder name matched by {split} -> split; folders not named here are ignored.
    splits: dict[str, Literal["train", "valid", "test"]] = {}
    marker: str = Field(default="@", min_length=1)
    body: str = Field(default="body", min_length=1)  # the name of the text before any marker
    source: str = Field(default="body", min_length=1)  # section read as `src`
    target: str = Field(min_length=1)  # section read as `tgt`; a document without it is malformed
    references: list[str] = []  # sections read as extra human references (`refs`), in order

    @model_validator(mode="after")
    def _sections_and_splits_fit(self) -> DocumentLayout:
        names = [self.source, self.target, *self.references]
        if len(set(names)) != len(names):
            raise ValueError(f"source, target and references must differ, got {names}")
        if self.body in (self.target, *self.references):
            raise ValueError(f"body {self.body!r} is the text before any marker: not a section")
        placeholders = self.members.count(SPLIT_PLACEHOLDER)
        if placeholders > 1:
            raise ValueError(f"members: {SPLIT_PLACEHOLDER} may appear once, in {self.members!r}")
        if placeholders and not self.splits:
            raise ValueError(f"members has {SPLIT_PLACEHOLDER}: map its folders with `splits`")
        if self.splits and not placeholders:
            raise ValueError(f"`splits` needs {SPLIT_PLACEHOLDER} in members {self.members!r}")
        return self


class SourceFile(Settings):
    url: str
    sha256: str | None = None  # missing: downloaded anyway, its digest printed to pin it
    split: Literal["train", "valid", "test"] | None = None  # None: split by clean.split_method
    lang: str | None = None  # parallel text files: which side this file holds
    member: str | None = None  # zip/tar archives: the path of the corpus file inside
    # text: one segment per line. tsv: tab-separated fields, no quoting (first row is the
    # header unless `columns` names them). jsonl: one JSON object per line. documents: an
    # archive of one document per member, laid out as `documents` says. reader: a Python
    # function (`reader`) turns the downloaded file into rows.
    format: Literal["text", "tsv", "jsonl", "documents", "reader"] = "text"
    # tsv/jsonl: column or key of each side, {text: ...} or {<src_lang>: ..., <tgt_lang>: ...}
    fields: dict[str, str] = {}
    columns: list[str] | None = None  # tsv without a header row: the column names, in order
    # Validated with their defaults too, so a missing block is an error at its own field.
    documents: DocumentLayout | None = Field(default=None, validate_default=True)
    # "package.module:function", called as function(path, source_file); it yields dicts
    # {split?, src, tgt, refs?} (checked by seqmodels.data.documents.check_row)
    reader: str | None = Field(default=None, validate_default=True)
    # reader rows: the most `refs` a row may have (None: DEFAULT_MAX_REFERENCES). None, not 4,
    # for other formats, so a dumped config (model_dump) validates again.
    max_references: int | None = Field(default=None, ge=0)
    # A growing entry names a set of train files instead of one (seqmodels.data.sources): a
    # glob (`file:///data/incoming/*.jsonl`, `s3://bucket/de-en/*.tsv.gz`), a folder prefix
    # ending in `/`, or, with `manifest: true`, a JSON manifest listing files with their sha256
    # (`{"files": [{"path" or "url": ..., "sha256": ..., "size": ...}]}`). Every other setting
    # of the entry (format, fields, member, ...) applies to each listed file.
    manifest: bool = False
    # A listing without sha256s (a glob, or manifest entries without one) is trusted: each
    # file's digest is computed after download. Needed with require_checksums; in the report.
    trust_listing: bool = False
    # Growing entries: files modified less than this long ago are left for the next run, so a
    # half-copied file is never read. None: DEFAULT_SETTLE_SECONDS.
    settle_seconds: float | None = Field(default=None, ge=0)
    # fsspec options of the filesystem (s3: {client_kwargs: {endpoint_url: ...}}, anon, ...).
    # Recorded with the config: keep credentials in the environment or the backend's files.
    storage_options: dict[str, Any] = {}

    @property
    def listing(self) -> Literal["manifest", "glob", "prefix"] | None:
        return listing_kind(self.url, self.manifest)

    @property
    def is_growing(self) -> bool:
        return self.listing is not None

    @property
    def settle(self) -> float:
        return DEFAULT_SETTLE_SECONDS if self.settle_seconds is None else self.settle_seconds

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None:
            value = value.lower()
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise ValueError(f"sha256 must be 64 hex digits, got {value!r}")
        return value

    @field_validator("documents")
    @classmethod
    def _documents_iff_format(
        cls, value: DocumentLayout | None, info: ValidationInfo
    ) -> DocumentLayout | None:
        if "format" not in info.data:
            return value  # the format's own error says what is wrong
        fmt = info.data["format"]
        if fmt == "documents" and value is None:
            raise ValueError("format documents needs a `documents:` block (members, target, ...)")
        if fmt != "documents" and value is not None:
            raise ValueError(f"`documents` is for format documents, not {fmt}")
        return value

    @field_validator("reader")
    @classmethod
    def _reader_iff_format(cls, value: str | None, info: ValidationInfo) -> str | None:
        if "format" not in info.data:
            return value
        fmt = info.data["format"]
        if fmt == "reader" and value is None:
            raise ValueError("format reader needs `reader: package.module:function`")
        if fmt != "reader" and value is not None:
            raise ValueError(f"`reader` is for format reader, not {fmt}")
        if value is not None:
            module, _, function = value.partition(":")
            dotted = [*module.split("."), function]
            if not all(part.isidentifier() for part in dotted):
                raise ValueError(f"reader must be 'package.module:function', got {value!r}")
        return value

    @model_validator(mode="after")
    def _growing_fits(self) -> SourceFile:
        if not self.is_growing:
            for name in ("trust_listing", "settle_seconds"):
                if getattr(self, name) not in (None, False):
                    raise ValueError(
                        f"{self.url}: {name} is for growing entries (a glob, a folder prefix "
                        "ending in / or manifest: true)"
                    )
            if urllib.parse.urlparse(self.url).scheme in ("http", "https") and "*" in self.url:
                raise ValueError(f"{self.url}: http(s) cannot be listed; use `manifest: true`")
            return self
        if self.split != "train":
            raise ValueError(
                f"{self.url}: split: a growing entry adds train files only (valid and test "
                f"stay pinned files, so every version is scored on the same test set); "
                f"got {self.split}, set split: train"
            )
        if self.sha256 is not None:
            raise ValueError(
                f"{self.url}: sha256 pins one file; a growing entry takes its digests from its "
                "manifest (or, with trust_listing, computes them after download)"
            )
        return self

    @model_validator(mode="after")
    def _format_fits(self) -> SourceFile:
        if self.format in PAIR_FORMATS and self.member:
            raise ValueError(
                f"{self.url}: `member` is not used by format {self.format} "
                "(documents.members selects the members; a reader opens the archive itself)"
            )
        if self.documents and self.documents.splits and self.split:
            raise ValueError(f"{self.url}: `split` is set, but documents.splits maps the folders")
        if self.max_references is not None and self.format != "reader":
            raise ValueError(f"{self.url}: `max_references` is for format reader")
        # A manifest or a folder prefix does not show the names of its files: each listed file
        # is checked when it is listed (seqmodels.data.sources).
        if self.listing not in ("manifest", "prefix"):
            self._archive_fits()
        return self._fields_fit()

    def _archive_fits(self) -> None:
        is_archive = self.url.lower().endswith(ARCHIVE_SUFFIXES)
        if self.format == "documents" and not is_archive:
            raise ValueError(f"{self.url}: format documents reads a zip/tar archive")
        if is_archive and not self.member and self.format in LINE_FORMATS:
            raise ValueError(f"{self.url} is an archive: name the corpus file in it with `member`")
        if self.member and not is_archive:
            raise ValueError(f"{self.url}: `member` is only for zip/tar archives")

    def _fields_fit(self) -> SourceFile:
        if self.format not in ("tsv", "jsonl") and self.fields:
            raise ValueError(f"{self.url}: `fields` is for tsv/jsonl files, not {self.format}")
        if self.format in ("tsv", "jsonl") and not self.fields:
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
    # First N lines of every file (documents/reader: first N documents or rows of each split):
    # quick runs.
    max_lines: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _sides_are_named(self) -> CorpusConfig:
        if self.kind == "monolingual":
            for f in self.files:
                if f.format in PAIR_FORMATS:
                    raise ValueError(f"file {f.url}: format {f.format} gives (src, tgt) pairs")
                if f.format != "text" and set(f.fields) != {"text"}:
                    raise ValueError(f"file {f.url}: fields must be {{text: <column>}}")
            return self
        if not self.src_lang or not self.tgt_lang:
            raise ValueError("a parallel corpus needs src_lang and tgt_lang")
        if self.src_lang == self.tgt_lang:
            # Only files that name their sides by role (documents, reader) can tell the two
            # apart; a language-keyed file or a pair of text files could not.
            keyed = [f.url for f in self.files if f.format in LINE_FORMATS]
            if keyed:
                raise ValueError(
                    f"src_lang and tgt_lang are both {self.src_lang!r}: files {keyed} are keyed "
                    "by language; only documents/reader files may have one language"
                )
        sides = {self.src_lang, self.tgt_lang}
        for f in self.files:
            if f.is_growing and f.format == "text":
                raise ValueError(
                    f"file {f.url}: format: a growing entry of a parallel corpus must be tsv or "
                    "jsonl (listed text files cannot be paired line by line)"
                )
            if f.format == "text" and f.lang not in sides:
                raise ValueError(
                    f"file {f.url}: lang must be {self.src_lang!r} or {self.tgt_lang!r}"
                )
            if f.format in ("tsv", "jsonl") and set(f.fields) != sides:
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
