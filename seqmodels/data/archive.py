"""Extract one corpus file from a zip or tar archive, or read many members into memory,
refusing members that escape.

A member whose path is absolute, climbs out with `..`, or is a link (symlink or hard link)
could write outside the extraction folder or point at a file there; such an archive is refused
as a whole, naming the member, before anything is written.
"""

from __future__ import annotations

import posixpath
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from seqmodels.data.textfile import CorruptInputError
from seqmodels.files import atomic_path

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class UnsafeArchiveError(ValueError):
    """An archive member that would land outside the extraction folder."""


def is_archive(path: Path | str) -> bool:
    name = str(path).lower()
    return name.endswith(".zip") or name.endswith(TAR_SUFFIXES)


def _check_member_path(archive: Path, name: str) -> str:
    normalised = posixpath.normpath(name.replace("\\", "/"))
    if (
        name.startswith(("/", "\\"))
        or (len(name) > 1 and name[1] == ":")  # C:\ on a Windows-made archive
        or normalised == ".."
        or normalised.startswith("../")
    ):
        raise UnsafeArchiveError(f"{archive}: member {name!r} escapes the extraction folder")
    return normalised


def extract_member(archive: Path, member: str, target: Path) -> Path:
    """Copy `member` of `archive` to `target` (atomically), after checking every member."""
    archive, target = Path(archive), Path(target)
    wanted = posixpath.normpath(member)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(target) as tmp:
            _copy_member(archive, wanted, member, tmp)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise CorruptInputError(f"{archive}: not a readable archive: {exc}") from exc
    return target


def _copy_member(archive: Path, wanted: str, member: str, tmp: str) -> None:
    """Check every member's path, then copy the wanted one to `tmp`."""
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = {}
            for info in zf.infolist():
                path = _check_member_path(archive, info.filename)
                # Unix symlinks are stored with S_IFLNK in the high bits of external_attr.
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a link")
                names[path] = info
            if wanted not in names:
                raise FileNotFoundError(
                    f"{archive}: no member {member!r}; it has {sorted(names)[:10]}"
                )
            with zf.open(names[wanted]) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    else:
        with tarfile.open(archive) as tf:
            found = None
            for info in tf.getmembers():
                path = _check_member_path(archive, info.name)
                if info.issym() or info.islnk():
                    raise UnsafeArchiveError(f"{archive}: member {info.name!r} is a link")
                if path == wanted and info.isfile():
                    found = info
            if found is None:
                raise FileNotFoundError(f"{archive}: no regular file member {member!r}")
            src = tf.extractfile(found)
            assert src is not None
            with src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def read_members(
    archive: Path, select: Callable[[list[str]], list[str]]
) -> Iterator[tuple[str, bytes]]:
    """(path, content) of the regular-file members `select` picks, in the order it returns.

    `select` gets the normalised paths of every regular file in the archive (after the same
    safety checks as `extract_member`) and returns those to read. The archive is opened once:
    a zip reads its members directly from the central directory; a tar reads its headers, then
    the chosen members in archive order (a forward pass, never a seek back per member, which
    would decompress a .tar.gz again for every one), holding their bytes until all are read.
    """
    archive = Path(archive)
    try:
        if archive.name.lower().endswith(".zip"):
            yield from _read_zip_members(archive, select)
        else:
            yield from _read_tar_members(archive, select)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise CorruptInputError(f"{archive}: not a readable archive: {exc}") from exc


def _read_zip_members(
    archive: Path, select: Callable[[list[str]], list[str]]
) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(archive) as zf:
        files = {}
        for info in zf.infolist():
            path = _check_member_path(archive, info.filename)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a link")
            if not info.is_dir():
                files[path] = info
        for path in select(list(files)):
            yield path, zf.read(files[path])


def _read_tar_members(
    archive: Path, select: Callable[[list[str]], list[str]]
) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(archive) as tf:
        files = {}
        for info in tf.getmembers():
            path = _check_member_path(archive, info.name)
            if info.issym() or info.islnk():
                raise UnsafeArchiveError(f"{archive}: member {info.name!r} is a link")
            if info.isfile():
                files[path] = info
        wanted = select(list(files))
        contents = {}
        for path in sorted(wanted, key=lambda p: files[p].offset):
            src = tf.extractfile(files[path])
            assert src is not None  # a regular file always has a reader
            with src:
                contents[path] = src.read()
        for path in wanted:
            yield path, contents.pop(path)
