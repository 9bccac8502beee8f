"""Growing corpora: corpus entries that name a set of files, and the corpus version a run saw.

A growing entry of `corpus.files` (see `SourceFile.listing`) is a glob or a folder prefix on
any fsspec filesystem (`file:///data/incoming/*.jsonl`, `s3://bucket/de-en/`), or a JSON
manifest (`manifest: true`, any URL the download stage reads, https included):

    {"files": [{"path": "part-0001.tsv.gz", "sha256": "...", "size": 123}, ...]}

where each file is a `url`, or a `path` relative to the manifest's folder. A run lists each
growing entry once, at its start (`list_source`); files modified less than `settle_seconds`
ago are left for the next run, so a half-copied file is never read. Each listed file is fetched
into the content-addressed download cache (`fetch_listed`; a file already there is not
fetched again), and the corpus is resolved into pinned files only (`resolve_corpus`): every
growing entry is replaced by one entry per file with its real sha256, so the cleaner reads the
union of all files and de-duplicates over it. What the run read is frozen as a
`CorpusVersion`: the sorted (url, size, sha256) of every file and a short digest.

Library code: no Prefect or MLflow here (tasks/ and flows/ wire it into the download stage).
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from dataclasses import asdict, astuple, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
from pydantic import ValidationError

from seqmodels.data.download import (
    DownloadError,
    TransientDownloadError,
    cached_path,
    download_file,
)
from seqmodels.data.settings import CorpusConfig, SourceFile
from seqmodels.files import atomic_write_text, json_digest

log = logging.getLogger(__name__)

LISTINGS_DIR = "listings"  # in the download cache: digests of files a trusted listing named
_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified")


class SourceError(DownloadError):
    """A growing entry that cannot be read as configured (bad manifest, unusable file name)."""


@dataclass(frozen=True)
class ListedFile:
    """One file a listing saw. sha256 comes from a manifest (None for a trusted listing);
    mtime (seconds since the epoch) is None where the filesystem or manifest does not say."""

    url: str
    size: int | None
    sha256: str | None
    mtime: float | None = None


@dataclass(frozen=True)
class Listing:
    """What listing one growing entry found: the files to read this run (sorted by url), and
    those left for the next run because they were modified within `settle_seconds`."""

    source: str
    files: tuple[ListedFile, ...]
    unsettled: tuple[str, ...] = ()


@dataclass(frozen=True)
class FetchedFile:
    """A corpus file in the download cache (`cache/<sha256>/<name>`). `downloaded`: fetched by
    this call (False: it was in the cache already; None: not known, e.g. a pinned file)."""

    url: str
    path: str
    downloaded: bool | None = None

    @property
    def sha256(self) -> str:
        return Path(self.path).parent.name  # the cache folder is the content's digest


@dataclass(frozen=True)
class VersionFile:
    url: str
    size: int
    sha256: str


@dataclass(frozen=True)
class VersionChanges:
    """Files of a version that were not in the previous one, and files that left. A file
    rewritten under the same URL is in both (its old and new content)."""

    added: tuple[VersionFile, ...]
    removed: tuple[VersionFile, ...]


@dataclass(frozen=True)
class CorpusVersion:
    """The sorted (url, size, sha256) of every file a run read, and their short digest."""

    files: tuple[VersionFile, ...]
    digest: str

    @classmethod
    def of(cls, files: list[VersionFile] | tuple[VersionFile, ...]) -> CorpusVersion:
        ordered = tuple(sorted(set(files), key=astuple))
        return cls(ordered, json_digest([astuple(f) for f in ordered]))

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "files": [asdict(f) for f in self.files]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CorpusVersion:
        version = cls.of([VersionFile(**f) for f in data["files"]])
        if version.digest != data["digest"]:
            raise ValueError(f"corpus version digest {data['digest']} does not match its files")
        return version

    def changes_since(self, previous: CorpusVersion | None) -> VersionChanges:
        before = set(previous.files) if previous else set()
        now = set(self.files)
        return VersionChanges(
            added=tuple(f for f in self.files if f not in before),
            removed=tuple(sorted(before - now, key=astuple)),
        )


def read_corpus_version(path: str | Path) -> CorpusVersion:
    """A version written by `ResolvedCorpus.record()` (corpus_version.json)."""
    return CorpusVersion.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _timestamp(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime):
        if value.tzinfo is None:  # object stores report UTC
            value = value.replace(tzinfo=timezone.utc)
        return value.timestamp()
    return None


def file_mtime(info: dict[str, Any]) -> float | None:
    """Modification time of an fsspec `info` entry; each backend names it its own way."""
    for key in _MTIME_KEYS:
        if info.get(key) is not None:
            return _timestamp(info[key])
    return None


def _listed_paths(source: SourceFile) -> tuple[Any, dict[str, dict[str, Any]]]:
    fs, path = fsspec.core.url_to_fs(source.url, **source.storage_options)
    if source.listing == "glob":
        found = fs.glob(path, detail=True)
    else:  # a prefix: every file under the folder
        found = fs.find(path, detail=True)
    return fs, found


def list_files(source: SourceFile, now: float | None = None) -> Listing:
    """List a glob or prefix entry once, leaving files modified within `settle_seconds`.

    Hidden files (a leading dot: how rsync and many uploaders name a partial file) are never
    listed. `now` defaults to the current time."""
    now = time.time() if now is None else now
    try:
        fs, found = _listed_paths(source)
    except ImportError as exc:
        raise SourceError(
            f"{source.url}: {exc} (pip install 'seqmodels[s3]' or 'seqmodels[gcs]')"
        ) from exc
    except (FileNotFoundError, PermissionError) as exc:
        raise SourceError(f"{source.url}: cannot be listed: {exc}") from exc
    except OSError as exc:
        raise TransientDownloadError(f"{source.url}: listing failed: {exc}") from exc
    files, unsettled = [], []
    for path, info in found.items():
        if info.get("type") != "file" or posixpath.basename(path).startswith("."):
            continue
        url = fs.unstrip_protocol(path)
        mtime = file_mtime(info)
        if mtime is not None and now - mtime < source.settle:
            unsettled.append(url)
            continue
        files.append(ListedFile(url, info.get("size"), None, mtime))
    files.sort(key=lambda f: f.url)
    return Listing(source.url, tuple(files), tuple(sorted(unsettled)))


def manifest_file(entry: Any, manifest_url: str, trust_listing: bool) -> ListedFile:
    """One entry of a manifest's `files`; a `path` is relative to the manifest's folder."""
    if not isinstance(entry, dict) or ("url" in entry) == ("path" in entry):
        raise SourceError(f"manifest {manifest_url}: each file needs a `url` or a `path`: {entry}")
    if "url" in entry:
        url = str(entry["url"])
    else:
        path = str(entry["path"])
        if path.startswith("/") or ".." in path.split("/"):
            raise SourceError(f"manifest {manifest_url}: path {path!r} must stay in its folder")
        url = manifest_url.rsplit("/", 1)[0] + "/" + path
    sha256 = entry.get("sha256")
    if sha256 is None and not trust_listing:
        raise SourceError(
            f"manifest {manifest_url}: {url} has no sha256 (add it, or set trust_listing: true)"
        )
    if sha256 is not None:
        sha256 = str(sha256).lower()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise SourceError(f"manifest {manifest_url}: {url}: sha256 is not 64 hex digits")
    size = entry.get("size")
    return ListedFile(url, None if size is None else int(size), sha256)


def read_manifest(source: SourceFile, cache_dir: Path, mirrors: list[str]) -> Listing:
    """Fetch the manifest (like a corpus file: mirrors, object stores; each version of it kept
    in the cache under its digest) and list its files. Settling does not apply: a manifest's
    writer adds a file once it is complete, and its sha256 is checked on download."""
    path = download_file(
        source.url,
        None,
        cache_dir,
        mirrors,
        storage_options=source.storage_options,
        warn_unpinned=False,
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SourceError(
            f'manifest {source.url}: not JSON of the form {{"files": [...]}}: {exc}'
        ) from exc
    files = [manifest_file(e, source.url, source.trust_listing) for e in entries]
    return Listing(source.url, tuple(sorted(files, key=lambda f: f.url)))


def list_source(
    source: SourceFile, cache_dir: Path, mirrors: list[str] | None = None, now: float | None = None
) -> Listing:
    """List a growing entry: its manifest, or its glob or prefix."""
    if source.listing == "manifest":
        return read_manifest(source, Path(cache_dir), mirrors or [])
    return list_files(source, now)


def _remembered(file: ListedFile, cache_dir: Path) -> Path:
    # A file of a trusted listing is known by (url, size, mtime) until it is downloaded; its
    # digest is remembered under that key so the next run finds it in the cache unfetched.
    return cache_dir / LISTINGS_DIR / f"{json_digest(file.url, file.size, file.mtime)}.sha256"


def fetch_listed(
    file: ListedFile, source: SourceFile, cache_dir: Path, mirrors: list[str] | None = None
) -> FetchedFile:
    """A listed file in the download cache: fetched only when it is not there yet, checked
    against the manifest's sha256 where there is one."""
    cache_dir = Path(cache_dir)
    sha256 = file.sha256
    remembered = _remembered(file, cache_dir)
    if sha256 is None and file.mtime is not None and remembered.is_file():
        sha256 = remembered.read_text().strip()
    cached = cached_path(file.url, sha256, cache_dir) if sha256 else None
    if cached is not None:
        return FetchedFile(file.url, str(cached), downloaded=False)
    path = download_file(
        file.url,
        file.sha256,
        cache_dir,
        mirrors,
        storage_options=source.storage_options,
        warn_unpinned=False,
    )
    if file.size is not None and path.stat().st_size != file.size:
        raise DownloadError(
            f"{file.url} was listed with {file.size} bytes but {path.stat().st_size} were read: "
            "it changed after it settled; the next run reads it again"
        )
    if file.sha256 is None and file.mtime is not None:
        atomic_write_text(remembered, path.parent.name)
    return FetchedFile(file.url, str(path), downloaded=True)


@dataclass(frozen=True)
class EntryFiles:
    """The files one entry of `corpus.files` gave this run: a pinned entry's one file, or a
    growing entry's listed files with its listing."""

    source: SourceFile
    files: tuple[FetchedFile, ...]
    listing: Listing | None = None


@dataclass(frozen=True)
class SourceSummary:
    """What a growing entry gave this run, for the cleaning report. checksums: `manifest`
    (each file checked against it), `trust_listing` (digests computed after download, as the
    config allows) or `unchecked` (no manifest, require_checksums off)."""

    url: str
    checksums: str
    files: int
    downloaded: int
    left_for_next_run: tuple[str, ...]


@dataclass(frozen=True)
class ResolvedCorpus:
    """The corpus a run reads: every growing entry replaced by one pinned entry per file (with
    its real sha256), the cache paths of `corpus.files` in order, and the frozen version."""

    corpus: CorpusConfig
    raw_paths: tuple[str, ...]
    version: CorpusVersion
    sources: tuple[SourceSummary, ...] = ()

    def record(self) -> dict[str, Any]:
        """corpus_version.json: the version (digest, files) and what each growing entry gave.
        Not how many files this run downloaded: the record is an input of the clean stage, and
        an unchanged corpus must hit its cache whatever was already in the download cache."""
        sources = [{k: v for k, v in asdict(s).items() if k != "downloaded"} for s in self.sources]
        return {**self.version.to_dict(), "sources": sources}


def version_report(record: dict[str, Any]) -> dict[str, Any]:
    """The cleaning report's `corpus_version` section: the digest, the file count and each
    growing entry's summary (how its checksums were checked, what is left for the next run)."""
    return {"digest": record["digest"], "files": len(record["files"]), "sources": record["sources"]}


def pinned_file(source: SourceFile, fetched: FetchedFile) -> SourceFile:
    """The entry of one listed file: the growing entry's settings, its URL and real digest."""
    data = {
        **source.model_dump(),
        "url": fetched.url,
        "sha256": fetched.sha256,
        "manifest": False,
        "trust_listing": False,
        "settle_seconds": None,
    }
    try:
        pinned = SourceFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(e["msg"] for e in exc.errors())
        raise SourceError(f"{fetched.url} (listed by {source.url}): {problems}") from None
    if pinned.is_growing:
        raise SourceError(
            f"{fetched.url} (listed by {source.url}): a file name with glob characters or "
            "ending in / cannot be told from a listing; rename it"
        )
    return pinned


def _summary(entry: EntryFiles) -> SourceSummary:
    source, listing = entry.source, entry.listing
    if source.listing == "manifest" and all(f.sha256 for f in listing.files):
        checksums = "manifest"
    else:
        checksums = "trust_listing" if source.trust_listing else "unchecked"
    return SourceSummary(
        url=source.url,
        checksums=checksums,
        files=len(entry.files),
        downloaded=sum(bool(f.downloaded) for f in entry.files),
        left_for_next_run=listing.unsettled,
    )


def resolve_corpus(corpus: CorpusConfig, entries: list[EntryFiles]) -> ResolvedCorpus:
    """The union of every entry's files as a corpus of pinned files, and its version.

    A listed file that is also a pinned entry (a glob that matches the test file) is read once,
    as the pinned entry says: valid and test stay pinned."""
    pinned_urls = {e.source.url for e in entries if e.listing is None}
    files: list[SourceFile] = []
    paths: list[str] = []
    summaries = []
    for entry in entries:
        if entry.listing is None:
            (fetched,) = entry.files
            files.append(entry.source)
            paths.append(fetched.path)
            continue
        summaries.append(_summary(entry))
        for fetched in entry.files:
            if fetched.url in pinned_urls:
                log.warning("%s lists %s, a pinned entry: read once", entry.source.url, fetched.url)
                continue
            files.append(pinned_file(entry.source, fetched))
            paths.append(fetched.path)
        if not entry.files:
            log.warning("%s: no files to read this run", entry.source.url)
    if not files:
        raise SourceError("the corpus has no files to read yet (every growing entry is empty)")
    resolved = CorpusConfig.model_validate(
        {**corpus.model_dump(), "files": [f.model_dump() for f in files]}
    )
    version = CorpusVersion.of(
        [
            VersionFile(f.url, Path(p).stat().st_size, Path(p).parent.name)
            for f, p in zip(files, paths, strict=True)
        ]
    )
    return ResolvedCorpus(resolved, tuple(paths), version, tuple(summaries))
