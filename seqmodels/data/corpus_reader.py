"""Read prepared corpus files into lazy Polars frames that all share one shape.

Formats (after `textfile.prepare_text_file` made them UTF-8 with LF line ends):
- text: one segment per line; a parallel corpus pairs two line-aligned files (Moses style);
- tsv: tab-separated fields without quoting (OPUS/Moses TSV); the first row is the header
  unless the config names the columns;
- jsonl: one JSON object per line; `fields` names the keys;
- documents / reader: prepared by `documents.prepare_documents` into one jsonl file per split
  whose keys are the roles `src`, `tgt` (not languages) and `refs` (extra references).

Every frame has `line` (1-based line number in its file), `source_file` (the URL), the segment
columns (`text`, or `src` and `tgt`, plus `refs` when a file of the corpus has references) and
`_malformed`: true for a non-blank tsv/jsonl line that lacks a field, so the cleaner can report
it by file and line instead of failing deep in Polars.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from seqmodels.data.archive import extract_member
from seqmodels.data.documents import PreparedSplit, prepare_documents, prepared_folder_key
from seqmodels.data.settings import PAIR_FORMATS, CorpusConfig, SourceFile
from seqmodels.data.textfile import (
    TextFileStats,
    first_nul_line,
    prepare_text_file,
    read_text_stats,
)

# The keys of a prepared documents/reader file: roles, not languages.
ROLE_FIELDS = {"src": "src", "tgt": "tgt"}
REFS_TYPE = pl.List(pl.String)


@dataclass
class InputFile:
    """A prepared (UTF-8, LF) corpus file and what the config says about it."""

    path: Path
    url: str
    split: str | None = None
    lang: str | None = None
    stats: TextFileStats | None = None
    format: str = "text"
    fields: dict[str, str] = field(default_factory=dict)
    columns: list[str] | None = None
    sha256: str | None = None
    references: int = 0  # jsonl with a `refs` list of up to this many references; 0: none


class AlignmentError(ValueError):
    """Line-aligned files that do not line up, or a split without both sides."""


class CorpusFormatError(ValueError):
    """A tsv/jsonl file whose header or fields do not match the config."""


def prepare_inputs(raw_paths: list[Path], corpus: CorpusConfig, work_dir: Path) -> list[InputFile]:
    """Extract (archives), decompress and normalise each downloaded file once.

    `raw_paths` are the cache paths of `corpus.files`, `cache/<sha256>/<name>`. Prepared
    text goes to `work_dir/text/<sha256>-<max_lines>[-<member>]/`, documents and reader rows
    to `work_dir/text/<sha256>-<format>-<max_lines>-<recipe digest>/` (one jsonl file per
    split), so both are shared by runs.

    Different downloaded files are prepared in parallel threads (reading, decompressing and
    the UTF-8 check release the GIL: the two sides of a 10M-pair corpus take 1.3 s instead of
    3.0); the sources of one file (archive members) in turn, as they share its folders.
    """
    if len(raw_paths) != len(corpus.files):
        raise ValueError(f"{len(raw_paths)} downloaded files for {len(corpus.files)} sources")

    def prepare(index: int) -> list[InputFile]:
        raw, source = Path(raw_paths[index]), corpus.files[index]
        if source.format in PAIR_FORMATS:
            return prepare_pair_source(raw, source, corpus.max_lines, Path(work_dir))
        return [prepare_text_source(raw, source, corpus.max_lines, Path(work_dir))]

    by_file: dict[Path, list[int]] = {}
    for index, raw in enumerate(raw_paths):
        by_file.setdefault(Path(raw), []).append(index)
    prepared: dict[int, list[InputFile]] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(len(by_file), os.cpu_count() or 1))) as pool:
        for indices, files in zip(
            by_file.values(),
            pool.map(lambda indices: [prepare(i) for i in indices], by_file.values()),
            strict=True,
        ):
            prepared.update(zip(indices, files, strict=True))
    return [f for index in range(len(raw_paths)) for f in prepared[index]]


def prepare_text_source(
    raw: Path, source: SourceFile, max_lines: int | None, work_dir: Path
) -> InputFile:
    """A text/tsv/jsonl file (or archive member), decompressed and normalised."""
    digest = raw.parent.name
    folder = work_dir / "text" / f"{digest}-{max_lines or 'all'}"
    if source.member:
        member = Path(source.member)
        folder = folder.with_name(folder.name + "-" + source.member.replace("/", "_"))
        extracted = folder / "member" / member.name
        if not extracted.exists():
            extract_member(raw, source.member, extracted)
        raw, name = extracted, member.name
    else:
        name = raw.name
    for suffix in (".gz", ".bz2", ".xz"):
        name = name.removesuffix(suffix)
    text = folder / name
    if text.exists():
        stats = read_text_stats(text)
    else:
        stats = prepare_text_file(raw, text, max_lines=max_lines)
    return InputFile(
        text,
        source.url,
        source.split,
        source.lang,
        stats,
        source.format,
        dict(source.fields),
        source.columns,
        digest,
    )


def prepare_pair_source(
    raw: Path, source: SourceFile, max_lines: int | None, work_dir: Path
) -> list[InputFile]:
    """A documents archive or a reader's rows: one role-keyed jsonl InputFile per split."""
    digest = raw.parent.name
    folder = work_dir / "text" / f"{digest}-{prepared_folder_key(source, max_lines)}"
    prepared: list[PreparedSplit] = prepare_documents(raw, source, max_lines, folder)
    return [
        InputFile(
            p.path,
            source.url,
            p.split,
            source.lang,
            p.stats,
            "jsonl",
            dict(ROLE_FIELDS),
            sha256=digest,
            references=p.references,
        )
        for p in prepared
    ]


def line_count(path: Path) -> int:
    return pl.scan_lines(path).select(pl.len()).collect().item()


def _scan_lines(path: Path, name: str, numbered: bool = True) -> pl.LazyFrame:
    """The lines of a prepared text file as column `name`, with their 1-based number as `line`.

    Read as a one-column CSV split on NUL (which text preparation removes) with no quoting:
    the same rows as `pl.scan_lines` (tested on empty lines, CR, quotes, a missing final
    newline), in morsels of ~27k rows instead of ~6.5k (two files zipped: ~3.5k). Expressions
    with a fixed cost per call (an Aho-Corasick automaton built, a regex compiled) pay it per
    morsel: on 2M pairs the whole clean took 15.4 CPU-s instead of 16.1 (medians of 3
    alternating runs). A NUL that got through anyway fails the scan with an error about an
    extra column, never silently. One difference: a U+FEFF that starts the file (a second
    BOM; preparation removed the first) is dropped, where scan_lines kept it. The control-
    character rule removes it from text anyway (it is Cf); a tsv header or jsonl first line
    that starts with it now parses instead of failing.
    """
    lines = pl.scan_csv(
        path,
        has_header=False,
        separator="\0",
        quote_char=None,
        schema={name: pl.String},
        empty_string_is_null=False,
        row_index_name="line" if numbered else None,
        row_index_offset=1,
    )
    return lines.with_columns(pl.col("line").cast(pl.Int64)) if numbered else lines


def _tsv_frame(file: InputFile, roles: dict[str, str]) -> pl.LazyFrame:
    """`roles` maps output column -> tsv column name."""
    columns, first_data_line = file.columns, 1
    if columns is None:
        with open(file.path, encoding="utf-8") as f:
            columns = f.readline().rstrip("\n").split("\t")
        first_data_line = 2
    missing = [c for c in roles.values() if c not in columns]
    if missing:
        raise CorpusFormatError(
            f"{file.url}: columns {missing} not in the tsv header {columns} "
            "(set `columns:` if the file has no header row)"
        )
    parts = pl.col("_raw").str.split("\t")
    lf = _scan_lines(file.path, "_raw").filter(pl.col("line") >= first_data_line)
    lf = lf.with_columns(
        _malformed=(parts.list.len() != len(columns)) & (pl.col("_raw").str.strip_chars() != ""),
        **{
            out: parts.list.get(columns.index(name), null_on_oob=True)
            for out, name in roles.items()
        },
    )
    return _fill_malformed(lf, roles)


def _jsonl_frame(file: InputFile, roles: dict[str, str]) -> pl.LazyFrame:
    def path_of(key: str) -> str:
        return "$['" + key.replace("\\", "\\\\").replace("'", "\\'") + "']"

    lf = _scan_lines(file.path, "_raw").with_columns(
        **{out: pl.col("_raw").str.json_path_match(path_of(key)) for out, key in roles.items()}
    )
    if file.references:
        refs = pl.col("_raw").str.json_path_match("$.refs").str.json_decode(REFS_TYPE)
        lf = lf.with_columns(refs=refs.fill_null(_no_refs()))
    missing_field = pl.any_horizontal([pl.col(out).is_null() for out in roles])
    lf = lf.with_columns(_malformed=missing_field & (pl.col("_raw").str.strip_chars() != ""))
    return _fill_malformed(lf, roles)


def _fill_malformed(lf: pl.LazyFrame, roles: dict[str, str]) -> pl.LazyFrame:
    # A malformed row keeps its raw line in every segment column, so the report can show it;
    # a blank line becomes empty segments (dropped as `empty`).
    return lf.with_columns(
        **{
            out: pl.when(pl.col("_malformed"))
            .then(pl.col("_raw"))
            .otherwise(pl.col(out).fill_null(""))
            for out in roles
        }
    ).drop("_raw")


def _no_refs() -> pl.Expr:
    return pl.lit([], dtype=REFS_TYPE)


def has_references(files: list[InputFile]) -> bool:
    """Whether the cleaned corpus gets a `refs` column (some file carries references)."""
    return any(f.references for f in files)


def scan_file(file: InputFile, roles: dict[str, str]) -> pl.LazyFrame:
    """One tsv/jsonl/text file as a frame with the columns named in `roles`."""
    if file.format == "tsv":
        lf = _tsv_frame(file, roles)
    elif file.format == "jsonl":
        lf = _jsonl_frame(file, roles)
    else:
        (out,) = roles
        lf = _scan_lines(file.path, out).with_columns(_malformed=pl.lit(False))
    return lf.with_columns(source_file=pl.lit(file.url))


def scan_text_pair(src: InputFile, tgt: InputFile) -> pl.LazyFrame:
    """Two line-aligned text files as one frame of (src, tgt) pairs."""
    # Text preparation counted the lines (InputFile.stats); counting again reads the files.
    n_src, n_tgt = (f.stats.lines if f.stats else line_count(f.path) for f in (src, tgt))
    if n_src != n_tgt:
        raise AlignmentError(
            f"aligned files differ in length: {src.url} has {n_src} lines, {tgt.url} has {n_tgt}"
        )
    # Zipped side by side, not joined on the line number: a join would hold one whole file in
    # a hash table; the line counts are equal, checked above.
    pair = pl.concat(
        [_scan_lines(src.path, "src"), _scan_lines(tgt.path, "tgt", numbered=False)],
        how="horizontal",
    )
    return pair.with_columns(_malformed=pl.lit(False), source_file=pl.lit(src.url))


def refuse_nul_bytes(files: list[InputFile]) -> None:
    """Files that prepare_inputs did not make (no stats: built by a caller of clean_corpus)
    are checked for NUL bytes, which the reader splits lines on (_scan_lines): an error
    naming the file and line before any work, instead of Polars' "more fields than defined
    in 'Schema'" mid-clean. Prepared files had theirs removed (and counted)."""
    for f in files:
        line = first_nul_line(f.path) if f.stats is None else None
        if line is not None:
            raise CorpusFormatError(
                f"{f.path}:{line}: NUL byte (in a file not prepared by prepare_inputs, which "
                "removes them; seqmodels.data.textfile.prepare_text_file prepares one file)"
            )


def scan_corpus(
    files: list[InputFile], kind: str, src_lang: str | None = None, tgt_lang: str | None = None
) -> list[tuple[InputFile, pl.LazyFrame]]:
    """Every segment source of the corpus with the file that names its split and lines."""
    refuse_nul_bytes(files)
    if kind != "parallel":
        return [(f, scan_file(f, {"text": f.fields.get("text", "")})) for f in files]
    units = []
    for f in files:
        if f.format != "text":
            if set(f.fields) == {src_lang, tgt_lang}:
                roles = {"src": f.fields[src_lang or ""], "tgt": f.fields[tgt_lang or ""]}
            else:  # prepared documents/reader rows are keyed by role (src_lang may be tgt_lang)
                roles = {"src": f.fields["src"], "tgt": f.fields["tgt"]}
            units.append((f, scan_file(f, roles)))
    text_files = [f for f in files if f.format == "text"]
    for split in dict.fromkeys(f.split for f in text_files):
        src = [f for f in text_files if f.split == split and f.lang == src_lang]
        tgt = [f for f in text_files if f.split == split and f.lang == tgt_lang]
        if len(src) != 1 or len(tgt) != 1:
            raise AlignmentError(
                f"split {split or 'unsplit'!r} needs exactly one {src_lang} and one {tgt_lang} "
                f"file, got {len(src)} and {len(tgt)}"
            )
        units.append((src[0], scan_text_pair(src[0], tgt[0])))
    if has_references(files):
        # Every frame gets the column, so they concatenate: no references is an empty list.
        units = [(f, lf if f.references else lf.with_columns(refs=_no_refs())) for f, lf in units]
    return units
