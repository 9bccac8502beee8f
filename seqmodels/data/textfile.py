"""Turn a downloaded file into clean UTF-8 lines that Polars can scan.

Rules, each counted so the quality report can show them:
- gzip / bz2 / xz are decompressed by file extension (a corrupt archive is an error naming it);
- a UTF-8 byte-order mark at the start is removed;
- CRLF and lone CR line ends become LF;
- NUL bytes are removed;
- bytes that are not valid UTF-8 become U+FFFD (the line is kept, the count reported).
The output is written to a temp file and renamed, so it is either complete or absent.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

from seqmodels.files import atomic_path, atomic_write_text

CHUNK = 8 << 20
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


@dataclass
class TextFileStats:
    lines: int = 0
    bom_removed: int = 0
    crlf_fixed: int = 0
    nul_removed: int = 0
    invalid_utf8_lines: int = 0


class CorruptInputError(RuntimeError):
    """A compressed file that cannot be decompressed (truncated or not what it claims)."""


def _open(path: Path) -> BinaryIO:
    opener = _OPENERS.get(path.suffix)
    return opener(path, "rb") if opener else open(path, "rb")  # type: ignore[return-value]


def _fix_chunk(chunk: bytes, stats: TextFileStats) -> bytes:
    if b"\r" in chunk:
        stats.crlf_fixed += chunk.count(b"\r\n") + chunk.replace(b"\r\n", b"").count(b"\r")
        chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if b"\0" in chunk:
        stats.nul_removed += chunk.count(b"\0")
        chunk = chunk.replace(b"\0", b"")
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        # Rare path: find the offending lines, replace their bad bytes, count them.
        fixed = []
        for line in chunk.split(b"\n"):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                stats.invalid_utf8_lines += 1
                line = line.decode("utf-8", errors="replace").encode("utf-8")
            fixed.append(line)
        chunk = b"\n".join(fixed)
    return chunk


def _lines_if_already_clean(source: Path) -> int | None:
    """The line count of an uncompressed file that no rule would change (valid UTF-8, no BOM,
    CR or NUL, a final newline), else None. One read-only pass: such a file (the common case
    for a large corpus) is then linked, not copied, which saves writing it again."""
    if source.suffix in _OPENERS:
        return None
    lines, pending = 0, bytearray()  # grows in place: a file with few newlines stays linear
    with open(source, "rb") as f:
        while block := f.read(CHUNK):
            if not lines and not pending and block.startswith(b"\xef\xbb\xbf"):
                return None
            if b"\r" in block or b"\0" in block:
                return None
            # Whole lines are checked (a newline byte is never inside a UTF-8 sequence), the
            # rest waits for the next block.
            cut = block.rfind(b"\n") + 1
            if not cut:
                pending += block
                continue
            if not is_utf8(pending + block[:cut]):
                return None
            pending = bytearray(block[cut:])
            lines += block.count(b"\n")
    return lines if not pending else None  # `pending`: a last line without its newline


def first_nul_line(path: Path) -> int | None:
    """The 1-based number of the first line of `path` holding a NUL byte; None if none does."""
    newlines = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            at = chunk.find(b"\0")
            if at >= 0:
                return newlines + chunk.count(b"\n", 0, at) + 1
            newlines += chunk.count(b"\n")
    return None


def is_utf8(data: bytes | bytearray) -> bool:
    """Whether `data` is valid UTF-8: Arrow's validation (SIMD), about 4x faster than
    decoding it in Python, which would also build the string."""
    try:
        pa.array([data], pa.binary()).cast(pa.string())
    except pa.ArrowInvalid:
        return False
    return True


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` becomes a hard link to `source` (a copy across filesystems), through a temp
    name and a rename like every artefact; the shared inode is never written or chmod-ed."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def prepare_text_file(source: Path, target: Path, max_lines: int | None = None) -> TextFileStats:
    """Decompress and normalise `source` into `target` (UTF-8, LF, final newline)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lines = _lines_if_already_clean(source) if max_lines is None else None
    if lines is not None:
        stats = TextFileStats(lines=lines)
        # Stats first: a target without its stats file is never taken as finished.
        atomic_write_text(_stats_path(target), json.dumps(asdict(stats)))
        _link_or_copy(source, target)
        return stats
    stats = TextFileStats()
    with atomic_path(target) as tmp:
        with _open(source) as f, open(tmp, "wb") as out:
            pending = b""
            first = True
            while True:
                try:
                    block = f.read(CHUNK)
                except (OSError, EOFError, lzma.LZMAError) as exc:
                    raise CorruptInputError(f"{source}: cannot decompress: {exc}") from exc
                if first and block.startswith(b"\xef\xbb\xbf"):
                    block = block[3:]
                    stats.bom_removed = 1
                first = False
                data = pending + block
                if block:
                    # Keep the tail after the last newline (and a trailing CR) for the next round,
                    # so a line or a CRLF pair is never split between chunks.
                    cut = data.rfind(b"\n") + 1
                    if data.endswith(b"\r"):
                        cut = min(cut, len(data) - 1) if cut else 0
                    data, pending = data[:cut], data[cut:]
                elif data and not data.endswith((b"\n", b"\r")):
                    data += b"\n"
                if data:
                    fixed = _fix_chunk(data, stats)
                    n = fixed.count(b"\n")
                    done = max_lines is not None and stats.lines + n >= max_lines
                    if done:
                        keep = max_lines - stats.lines
                        fixed = b"".join(line + b"\n" for line in fixed.split(b"\n")[:keep])
                        n = keep
                    out.write(fixed)
                    stats.lines += n
                    if done:
                        break
                if not block:
                    break
        # Stats first: a target without its stats file is never taken as finished.
        atomic_write_text(_stats_path(target), json.dumps(asdict(stats)))
    return stats


def _stats_path(target: Path) -> Path:
    return target.with_name(target.name + ".stats.json")


def read_text_stats(target: Path) -> TextFileStats:
    return TextFileStats(**json.loads(_stats_path(target).read_text()))
