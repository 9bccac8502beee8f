"""Fetch corpus files by URL into a content-addressed cache.

Each file lands at `cache_dir/<sha256>/<basename>`, and only after its digest was checked, so a
file in the cache is complete by construction. Mirrors (folders or http(s) roots laid out as
`HOST/PATH` of the canonical URL, like `wget --mirror`) are tried before the canonical URL.
Object stores (s3://, gs://, az://) are read through fsspec (its s3fs/gcsfs/adlfs backends
are optional extras); their mirrors use the same layout, the bucket as HOST.
Retrying is the orchestrator's job: transient failures raise `TransientDownloadError`, and
everything else (404, checksum mismatch) is final.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import fsspec
from tqdm import tqdm

from seqmodels.data.settings import FSSPEC_SCHEMES
from seqmodels.files import file_sha256

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PROGRESS_MIN_BYTES = 32 << 20  # only show a progress bar for files worth watching


class DownloadError(RuntimeError):
    """A download that will not succeed by retrying (missing file, bad checksum, bad URL)."""


class ChecksumMismatchError(DownloadError):
    def __init__(self, url: str, expected: str, actual: str):
        super().__init__(
            f"checksum mismatch for {url}: expected sha256 {expected}, got {actual}; "
            "the file was discarded"
        )
        self.url, self.expected, self.actual = url, expected, actual


class TransientDownloadError(RuntimeError):
    """Connection reset, timeout, 429 or 5xx: worth retrying later."""


def mirror_candidates(url: str, mirrors: list[str]) -> list[str]:
    """URLs to try, in order: each mirror's copy of `url`, then `url` itself."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https", "file", *FSSPEC_SCHEMES):
        raise DownloadError(
            f"unsupported URL scheme in {url!r} (use https, http, file, or an object store: "
            f"{', '.join(FSSPEC_SCHEMES)})"
        )
    candidates = []
    if parsed.scheme != "file":
        relative = f"{parsed.netloc}{parsed.path}"
        for root in mirrors:
            if "://" in root:
                candidates.append(root.rstrip("/") + "/" + urllib.parse.quote(relative))
            else:
                candidates.append(Path(root).resolve().joinpath(relative).as_uri())
    candidates.append(url)
    return candidates


def _copy_local(source: str, part: Path) -> None:
    path = Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path))
    if not path.is_file():
        raise FileNotFoundError(path)
    shutil.copyfile(path, part)


def _http_get(source: str, part: Path, timeout: float) -> None:
    """Download to `part`, resuming with a Range request when a partial file is there."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(source, headers={"User-Agent": "seqmodels"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # we already hold every byte
            return
        raise
    with response:
        resumed = response.status == 206
        mode = "ab" if resumed else "wb"
        total = response.length + (have if resumed else 0) if response.length else None
        with (
            open(part, mode) as out,
            tqdm(
                total=total,
                initial=have if resumed else 0,
                unit="B",
                unit_scale=True,
                desc=Path(source).name,
                disable=not total or total < PROGRESS_MIN_BYTES,
            ) as bar,
        ):
            while chunk := response.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
        if total is not None and part.stat().st_size < total:
            raise TransientDownloadError(f"{source}: connection closed early")


def _fsspec_get(source: str, part: Path, storage_options: dict[str, Any]) -> None:
    """Copy an object-store file to `part` through fsspec, from its start (a retry fetches the
    object again). Missing: FileNotFoundError; refused: final; other I/O errors: transient."""
    try:
        with fsspec.open(source, "rb", **storage_options) as remote, open(part, "wb") as out:
            shutil.copyfileobj(remote, out, CHUNK)
    except ImportError as exc:  # the backend is an optional extra
        raise DownloadError(
            f"{source}: {exc} (install the extra: pip install 'seqmodels[s3]' or 'seqmodels[gcs]')"
        ) from exc
    except (FileNotFoundError, DownloadError):
        raise
    except PermissionError as exc:
        raise DownloadError(f"{source}: access refused: {exc}") from exc
    except OSError as exc:
        raise TransientDownloadError(f"{source}: {exc}") from exc


def _fetch_one(source: str, part: Path, timeout: float, storage_options: dict[str, Any]) -> None:
    scheme = urllib.parse.urlparse(source).scheme
    if scheme == "file":
        _copy_local(source, part)
    elif scheme in ("http", "https"):
        _http_get(source, part, timeout)
    else:
        _fsspec_get(source, part, storage_options)


def cache_name(url: str) -> str:
    """The file name `url`'s content gets in the cache (`cache_dir/<sha256>/<name>`)."""
    return Path(urllib.parse.urlparse(url).path).name or "download"


def cached_path(url: str, sha256: str, cache_dir: Path) -> Path | None:
    """Where `url` with this content is in the cache, or None when it is not there."""
    cached = Path(cache_dir) / sha256 / cache_name(url)
    return cached if cached.is_file() else None


def download_file(
    url: str,
    sha256: str | None,
    cache_dir: Path,
    mirrors: list[str] | None = None,
    timeout: float = 60.0,
    *,
    storage_options: dict[str, Any] | None = None,
    warn_unpinned: bool = True,
) -> Path:
    """Return the path of `url`'s content in the cache, downloading it if needed.

    With `sha256` None the file is downloaded, its digest logged with a warning on how to pin
    it (unless `warn_unpinned` is False: files of a listing, a manifest), and it is cached under
    that digest. `storage_options` go to fsspec for object-store URLs.
    """
    cache_dir = Path(cache_dir)
    name = cache_name(url)
    if sha256 is not None:
        cached = cached_path(url, sha256, cache_dir)
        if cached is not None:
            return cached
    tmp_dir = cache_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    key = sha256 or hashlib.sha256(url.encode()).hexdigest()
    transient: list[str] = []
    missing: list[str] = []
    for source in mirror_candidates(url, mirrors or []):
        # One partial file per source: a resumed download must continue the same bytes. (Not
        # files.atomic_path, which deletes its temp file on failure: a .part file must
        # survive a dropped connection or a crash so the retry resumes with a Range request.
        # It only gets its final name after the checksum passes.)
        source_key = hashlib.sha256(source.encode()).hexdigest()[:16]
        part = tmp_dir / f"{key}.{source_key}.part"
        try:
            # Storage options belong to the canonical URL's filesystem, not a mirror's.
            options = (storage_options or {}) if source == url else {}
            _fetch_one(source, part, timeout, options)
        except FileNotFoundError:
            missing.append(source)
            continue
        except urllib.error.HTTPError as exc:
            if exc.code in (429,) or exc.code >= 500:
                transient.append(f"{source}: HTTP {exc.code}")
            else:
                missing.append(f"{source} (HTTP {exc.code})")
                part.unlink(missing_ok=True)
            continue
        except (
            urllib.error.URLError,
            TimeoutError,
            ConnectionError,
            TransientDownloadError,
        ) as exc:
            transient.append(f"{source}: {getattr(exc, 'reason', exc)}")
            continue
        actual = file_sha256(part)
        if sha256 is not None and actual != sha256:
            part.unlink()
            raise ChecksumMismatchError(
                url if source == url else f"{url} (via {source})", sha256, actual
            )
        if sha256 is None and warn_unpinned:
            log.warning("%s has no sha256 in the config; pin it with `sha256: %s`", url, actual)
        final = cache_dir / actual / name
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
        log.info("fetched %s from %s", url, source)
        return final
    if transient:
        raise TransientDownloadError(f"could not download {url}: " + "; ".join(transient))
    raise DownloadError(f"{url} not found; tried: " + ", ".join(missing))
