"""Corpora that are not one segment per line: one document per archive member (format
documents), or rows produced by a user's Python function (format reader).

Both are prepared into one JSONL file per split, each line
`{"src": ..., "tgt": ..., "refs": [...], "member": ...}`, which the cleaner then reads like any
jsonl file with fields {src: src, tgt: tgt}. `member` is the archive member (or `row N` of a
reader), so a report can point at the document. A document or row without its source or target
is written with a `problem` instead of the missing side: the cleaner sees a malformed row, and
`clean.on_malformed` decides whether that fails the run or drops it.

The folder of prepared files is written whole or not at all: each split file is atomic, and
`prepared.json` (the list of files and their stats) is written last; a folder without it is
prepared again.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from seqmodels.data.archive import read_members
from seqmodels.data.settings import (
    DEFAULT_MAX_REFERENCES,
    SPLIT_PLACEHOLDER,
    DocumentLayout,
    SourceFile,
)
from seqmodels.data.textfile import TextFileStats
from seqmodels.files import atomic_open, atomic_write_text, file_sha256, json_digest

SPLITS = ("train", "valid", "test")
# Part of the prepared folder's key: bump it when the JSONL written here changes shape.
PREPARED_VERSION = 1
MANIFEST = "prepared.json"
ROW_FIELDS = ("split", "src", "tgt", "refs")


class DocumentLayoutError(ValueError):
    """An archive that does not fit its `documents` layout (e.g. a split without members)."""


class ReaderError(ValueError):
    """A reader that cannot be imported, fails, or yields a row outside the schema."""


@dataclass
class PreparedSplit:
    """One prepared JSONL file: the rows of one split (None: split later by the cleaner)."""

    path: Path
    split: str | None
    stats: TextFileStats  # lines: rows written; the byte fixes of documents (BOM, CRLF, ...)
    references: int  # the most `refs` a row may carry; 0: the file has no references


# ---------------------------------------------------------------------------------------------
# documents: one document per archive member


def member_pattern(members: str) -> re.Pattern[str]:
    """The regex of a member glob: `*` and `?` stay within one folder, `**` crosses folders,
    `{split}` captures one folder name (group `split`)."""
    parts = re.split(r"(\*\*|\*|\?|\{split\})", members)
    table = {"**": ".*", "*": "[^/]*", "?": "[^/]", SPLIT_PLACEHOLDER: "(?P<split>[^/]+)"}
    return re.compile("".join(table.get(p, re.escape(p)) for p in parts))


def select_members(
    names: list[str], source: SourceFile, max_lines: int | None
) -> dict[str, str | None]:
    """{member: split} of the documents to read, sorted by path; the first `max_lines` of each
    split. A split the layout names but no member matches is an error."""
    layout = source.documents
    assert layout is not None  # format documents: checked by the config
    pattern = member_pattern(layout.members)
    chosen: dict[str, str | None] = {}
    per_split: dict[str | None, int] = {}
    found: set[str] = set()
    for name in sorted(names):
        match = pattern.fullmatch(name)
        if match is None:
            continue
        folder = match.groupdict().get("split")
        if folder is None:
            split = source.split
        elif folder in layout.splits:
            split = layout.splits[folder]
            found.add(folder)
        else:
            continue  # a folder the layout does not map, e.g. a README folder
        per_split[split] = per_split.get(split, 0) + 1
        if max_lines is None or per_split[split] <= max_lines:
            chosen[name] = split
    missing = sorted(set(layout.splits) - found)
    if missing or not per_split:
        raise DocumentLayoutError(
            f"{source.url}: no member matches {layout.members!r}"
            + (f" for split folder(s) {missing}" if missing else "")
            + f"; members look like {sorted(names)[:5]}"
        )
    return chosen


def decode_document(data: bytes, stats: TextFileStats) -> str:
    """A member's bytes as text, fixed and counted like a prepared text file: BOM removed,
    CRLF/CR to LF, NUL removed, invalid UTF-8 replaced by U+FFFD."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
        stats.bom_removed += 1
    if b"\r" in data:
        stats.crlf_fixed += data.count(b"\r\n") + data.replace(b"\r\n", b"").count(b"\r")
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if b"\0" in data:
        stats.nul_removed += data.count(b"\0")
        data = data.replace(b"\0", b"")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        lines = data.split(b"\n")
        stats.invalid_utf8_lines += sum(not _is_utf8(line) for line in lines)
        return data.decode("utf-8", errors="replace")


def _is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def split_sections(text: str, layout: DocumentLayout) -> tuple[dict[str, str], str | None]:
    """The sections of one document, {name: text}, and the problem that makes it malformed.

    Only the layout's own section names are markers: an email body may well hold a line such
    as `@john`, which must stay body text, not start a section nobody asked for.
    """
    names = {layout.source, layout.target, *layout.references} - {layout.body}
    sections: dict[str, list[str]] = {layout.body: []}
    current, problem = layout.body, None
    for line in text.split("\n"):
        stripped = line.rstrip()
        name = stripped[len(layout.marker) :] if stripped.startswith(layout.marker) else None
        if name in names:
            if name in sections and problem is None:
                problem = f"section {layout.marker}{name} appears twice"
            current = name
            sections[current] = []
        else:
            sections[current].append(line)
    found = {name: "\n".join(lines).strip() for name, lines in sections.items()}
    for side in (layout.source, layout.target):
        if side not in found and problem is None:
            problem = f"no {layout.marker}{side} section"
    return found, problem


def document_row(member: str, text: str, layout: DocumentLayout) -> dict[str, Any]:
    """The JSONL row of one document; malformed ones carry `problem` and no missing side."""
    sections, problem = split_sections(text, layout)
    # Absent or empty reference sections are left out: an empty reference would score every
    # output as wrong.
    refs = [sections[name] for name in layout.references if sections.get(name)]
    if problem is not None:
        # member and problem first: the raw line is what a malformed-row report shows.
        row = {"member": member, "problem": problem}
        if layout.source in sections:
            row["src"] = sections[layout.source]
        return row
    return {
        "src": sections[layout.source],
        "tgt": sections[layout.target],
        "refs": refs,
        "member": member,
    }


def document_rows(
    archive: Path, source: SourceFile, max_lines: int | None, stats: dict[str | None, TextFileStats]
) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """(split, row) of every selected document of `archive`, sorted by member path."""
    layout = source.documents
    assert layout is not None
    chosen: dict[str, str | None] = {}

    def select(names: list[str]) -> list[str]:
        chosen.update(select_members(names, source, max_lines))
        return list(chosen)

    for member, data in read_members(archive, select):
        split = chosen[member]
        text = decode_document(data, stats.setdefault(split, TextFileStats()))
        yield split, document_row(member, text, layout)


# ---------------------------------------------------------------------------------------------
# reader: a user's function


def load_reader(spec: str) -> Callable[..., Iterable[Any]]:
    """The function named `package.module:function`; a clear error when it is not there."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ReaderError(f"reader {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ReaderError(f"reader {spec!r}: module {module_name!r} has no function {attribute!r}")
    return function


def reader_fingerprint(spec: str) -> str:
    """A digest of the file that defines the reader, so editing it prepares the rows again."""
    try:
        path = inspect.getsourcefile(load_reader(spec))
    except TypeError:  # a builtin or C function: its name is all there is
        path = None
    return file_sha256(path) if path and Path(path).is_file() else spec


def check_row(row: Any, number: int, source: SourceFile) -> tuple[str, dict[str, Any]]:
    """(split, JSONL row) of reader row `number` (1-based); ReaderError when it breaks the
    schema. A row without `src` or `tgt` is not an error here: it becomes a malformed row."""
    where = f"reader {source.reader!r}, row {number}"
    if not isinstance(row, dict):
        raise ReaderError(f"{where}: a row must be a dict, got {type(row).__name__}")
    unknown = sorted(map(str, set(row) - set(ROW_FIELDS)))
    if unknown:
        raise ReaderError(f"{where}: unknown field(s) {unknown}; a row has {list(ROW_FIELDS)}")
    for name in ("split", "src", "tgt"):
        if row.get(name) is not None and not isinstance(row[name], str):
            raise ReaderError(f"{where}: field {name!r} must be a string, got {row[name]!r}")
    split = row["split"] if row.get("split") is not None else source.split
    if split is None:
        raise ReaderError(f"{where}: field 'split' is missing and the file has no `split`")
    if split not in SPLITS or (source.split and split != source.split):
        allowed = [source.split] if source.split else list(SPLITS)
        raise ReaderError(f"{where}: field 'split' must be one of {allowed}, got {split!r}")
    refs = row.get("refs")
    refs = [] if refs is None else refs
    if not isinstance(refs, (list, tuple)) or not all(isinstance(r, str) for r in refs):
        raise ReaderError(f"{where}: field 'refs' must be a list of strings, got {refs!r}")
    most = DEFAULT_MAX_REFERENCES if source.max_references is None else source.max_references
    if len(refs) > most:
        raise ReaderError(
            f"{where}: field 'refs' has {len(refs)} references, more than max_references {most}"
        )
    missing = [name for name in ("src", "tgt") if row.get(name) is None]
    if missing:
        problem = f"no {' and no '.join(missing)}"
        present = {k: row[k] for k in ("src", "tgt") if row.get(k) is not None}
        return split, {"member": f"row {number}", "problem": problem, **present}
    return split, {
        "src": row["src"],
        "tgt": row["tgt"],
        "refs": list(refs),
        "member": f"row {number}",
    }


def reader_rows(
    path: Path, source: SourceFile, max_lines: int | None
) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """(split, row) of every row the reader yields, checked; the first `max_lines` of each
    split."""
    assert source.reader is not None  # format reader: checked by the config
    function = load_reader(source.reader)
    per_split: dict[str, int] = {}
    number = 0
    try:
        rows = iter(function(path, source))
    except Exception as exc:
        raise ReaderError(f"reader {source.reader!r} failed on {path}: {exc}") from exc
    while True:
        # Only the reader's own code is inside the try: our ReaderError must not be rewrapped.
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:
            raise ReaderError(f"reader {source.reader!r} failed after row {number}: {exc}") from exc
        number += 1
        split, out = check_row(row, number, source)
        per_split[split] = per_split.get(split, 0) + 1
        if max_lines is None or per_split[split] <= max_lines:
            yield split, out


# ---------------------------------------------------------------------------------------------
# the prepared folder


def prepared_folder_key(source: SourceFile, max_lines: int | None) -> str:
    """What the prepared files depend on besides the downloaded file's digest."""
    if source.format == "reader":
        assert source.reader is not None
        recipe: Any = [source.model_dump(), reader_fingerprint(source.reader)]
    else:
        recipe = [source.documents.model_dump() if source.documents else None, source.split]
    return f"{source.format}-{max_lines or 'all'}-" + json_digest(PREPARED_VERSION, recipe)


def write_split_files(
    rows: Iterable[tuple[str | None, dict[str, Any]]], folder: Path
) -> dict[str | None, tuple[Path, int, int]]:
    """Write each split's rows to `folder/<split>.jsonl` (each file atomic, all or none);
    returns {split: (path, rows, most refs in a row)}."""
    written: dict[str | None, list] = {}
    with ExitStack() as stack:
        outputs: dict[str | None, IO[str]] = {}
        for split, row in rows:
            if split not in outputs:
                path = folder / f"{split or 'all'}.jsonl"
                outputs[split] = stack.enter_context(atomic_open(path, "w"))
                written[split] = [path, 0, 0]
            outputs[split].write(json.dumps(row, ensure_ascii=False) + "\n")
            written[split][1] += 1
            written[split][2] = max(written[split][2], len(row.get("refs", ())))
    return {split: (path, n, refs) for split, (path, n, refs) in written.items()}


def prepare_documents(
    raw: Path, source: SourceFile, max_lines: int | None, folder: Path
) -> list[PreparedSplit]:
    """Prepare a documents/reader source into one JSONL file per split under `folder`, or
    reuse what an earlier run prepared there."""
    manifest = folder / MANIFEST
    if manifest.exists():
        return read_manifest(manifest)
    stats: dict[str | None, TextFileStats] = {}
    if source.format == "documents":
        assert source.documents is not None
        rows = document_rows(raw, source, max_lines, stats)
        references = len(source.documents.references)
    else:
        rows, references = reader_rows(raw, source, max_lines), -1
    written = write_split_files(rows, folder)
    if references < 0:  # a reader: the rows tell whether the corpus has references
        references = max((refs for _, _, refs in written.values()), default=0)
    if not written:
        raise ReaderError(f"reader {source.reader!r} yielded no rows from {raw}")
    order = {split: i for i, split in enumerate((*SPLITS, None))}
    prepared = []
    for split in sorted(written, key=order.__getitem__):
        path, n, _ = written[split]
        file_stats = stats.get(split, TextFileStats())
        file_stats.lines = n
        prepared.append(PreparedSplit(path, split, file_stats, references))
    entries = [
        {"file": p.path.name, "split": p.split, "stats": asdict(p.stats), "refs": p.references}
        for p in prepared
    ]
    atomic_write_text(manifest, json.dumps(entries, indent=1))
    return prepared


def read_manifest(manifest: Path) -> list[PreparedSplit]:
    entries = json.loads(manifest.read_text())
    return [
        PreparedSplit(
            manifest.parent / e["file"], e["split"], TextFileStats(**e["stats"]), e["refs"]
        )
        for e in entries
    ]
