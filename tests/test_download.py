"""The download stage: mirrors, checksums, cache, resume and the errors a user sees."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from seqmodels.config import SourceFile
from seqmodels.data.download import (
    ChecksumMismatchError,
    DownloadError,
    TransientDownloadError,
    download_file,
    mirror_candidates,
)
from seqmodels.data.textfile import CorruptInputError, prepare_text_file
from tests.conftest import MULTI30K, SHAKESPEARE_SHA256, SHAKESPEARE_URL

SHAKESPEARE_PATH = "/" + SHAKESPEARE_URL.removeprefix("https://")


def test_mirror_candidates_follow_the_host_path_layout(tmp_path):
    candidates = mirror_candidates(
        "https://example.org/data/a.txt", [str(tmp_path), "http://m/root/"]
    )
    assert candidates == [
        (tmp_path / "example.org/data/a.txt").as_uri(),
        "http://m/root/example.org/data/a.txt",
        "https://example.org/data/a.txt",
    ]


def test_mirror_folder_gives_a_checked_file_in_the_content_addressed_cache(mirror, tmp_path):
    path = download_file(SHAKESPEARE_URL, SHAKESPEARE_SHA256, tmp_path, [str(mirror)])
    assert path == tmp_path / SHAKESPEARE_SHA256 / "input.txt"
    assert path.stat().st_size == 1_115_394
    # The second call is a cache hit: it works without any mirror at all.
    assert download_file(SHAKESPEARE_URL, SHAKESPEARE_SHA256, tmp_path, []) == path


def test_http_mirror_is_downloaded_over_loopback(http_mirror, tmp_path):
    base, server = http_mirror
    path = download_file(SHAKESPEARE_URL, SHAKESPEARE_SHA256, tmp_path, [base])
    assert path.stat().st_size == 1_115_394
    assert server.requests == [(SHAKESPEARE_PATH, None)]


def test_checksum_mismatch_names_url_and_digests_and_leaves_no_file(mirror, tmp_path):
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatchError) as err:
        download_file(SHAKESPEARE_URL, wrong, tmp_path, [str(mirror)])
    message = str(err.value)
    assert SHAKESPEARE_URL in message and wrong in message and SHAKESPEARE_SHA256 in message
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_missing_file_is_a_final_error_listing_what_was_tried(http_mirror, tmp_path):
    base, _ = http_mirror
    url = base + "/nothing/missing.txt"
    with pytest.raises(DownloadError, match="missing.txt not found.*HTTP 404"):
        download_file(url, None, tmp_path, timeout=2)


def test_503_is_transient_and_the_retry_succeeds(http_mirror, tmp_path):
    base, server = http_mirror
    server.faults[SHAKESPEARE_PATH] = ["503"]
    # Only the mirror is offered, so nothing else can mask the failure.
    url = base + SHAKESPEARE_PATH
    with pytest.raises(TransientDownloadError, match="503"):
        download_file(url, SHAKESPEARE_SHA256, tmp_path)
    assert download_file(url, SHAKESPEARE_SHA256, tmp_path).stat().st_size == 1_115_394


def test_dropped_connection_resumes_with_a_range_request(http_mirror, tmp_path):
    base, server = http_mirror
    server.faults[SHAKESPEARE_PATH] = ["drop"]
    url = base + SHAKESPEARE_PATH
    with pytest.raises(TransientDownloadError):
        download_file(url, SHAKESPEARE_SHA256, tmp_path)
    path = download_file(url, SHAKESPEARE_SHA256, tmp_path)
    assert path.stat().st_size == 1_115_394
    assert server.requests[-1] == (SHAKESPEARE_PATH, f"bytes={1_115_394 // 2}-")


def test_unpinned_file_is_cached_under_its_digest_with_a_warning(mirror, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        path = download_file(SHAKESPEARE_URL, None, tmp_path, [str(mirror)])
    assert path.parent.name == SHAKESPEARE_SHA256
    assert f"sha256: {SHAKESPEARE_SHA256}" in caplog.text


def test_unsupported_scheme_is_refused(tmp_path):
    with pytest.raises(DownloadError, match="unsupported URL scheme"):
        download_file("ftp://example.org/a.txt", None, tmp_path)


@pytest.mark.parametrize("fault", ["429", "slow"])
def test_rate_limit_and_timeout_are_transient(http_mirror, tmp_path, fault):
    base, server = http_mirror
    server.faults[SHAKESPEARE_PATH] = [fault]
    url = base + SHAKESPEARE_PATH
    with pytest.raises(TransientDownloadError):
        download_file(url, SHAKESPEARE_SHA256, tmp_path, timeout=1)
    assert download_file(url, SHAKESPEARE_SHA256, tmp_path, timeout=10).is_file()


def test_truncated_gzip_served_whole_is_caught_when_the_text_is_prepared(http_mirror, tmp_path):
    """An unpinned archive that arrives truncated downloads fine (its digest is new), but the
    text stage refuses it by name and leaves nothing behind."""
    base, server = http_mirror
    path = MULTI30K.removeprefix("https:/") + "val.de.gz"
    server.faults[path] = ["truncate"]
    raw = download_file(base + path, None, tmp_path / "cache")
    with pytest.raises(CorruptInputError, match="val.de.gz"):
        prepare_text_file(raw, tmp_path / "text" / "val.de")
    assert not (tmp_path / "text" / "val.de").exists()


def _download_in_flow(source: SourceFile, cache_dir, delays: int = 0):
    """Run the real Prefect download task (with its retry policy, delays shortened)."""
    from prefect import flow

    from tasks.data import download_corpus_file

    @flow
    def fetch():
        task = download_corpus_file.with_options(retry_delay_seconds=delays)
        state = task(source, [], str(cache_dir), "test-workspace", return_state=True)
        # Plain values: a flow that returns a failed state would fail itself.
        return state.type.value, state.result(raise_on_failure=False)

    return fetch()


def test_prefect_retries_transient_failures_until_the_download_succeeds(
    prefect_api, http_mirror, tmp_path
):
    base, server = http_mirror
    server.faults[SHAKESPEARE_PATH] = ["503", "drop"]
    source = SourceFile(url=base + SHAKESPEARE_PATH, sha256=SHAKESPEARE_SHA256)
    outcome, path = _download_in_flow(source, tmp_path)
    assert outcome == "COMPLETED"
    assert Path(path).stat().st_size == 1_115_394
    # 503, then half the body, then a Range request for the rest.
    assert [r[1] for r in server.requests] == [None, None, f"bytes={1_115_394 // 2}-"]


@pytest.mark.parametrize("problem", ["404", "checksum"])
def test_prefect_does_not_retry_a_missing_file_or_a_checksum_mismatch(
    prefect_api, http_mirror, tmp_path, problem
):
    base, server = http_mirror
    if problem == "404":
        source = SourceFile(url=base + "/nothing/here.txt", sha256=SHAKESPEARE_SHA256)
    else:
        source = SourceFile(url=base + SHAKESPEARE_PATH, sha256="0" * 64)
    outcome, error = _download_in_flow(source, tmp_path)
    assert outcome == "FAILED"
    assert "not found" in str(error) if problem == "404" else "checksum mismatch" in str(error)
    assert len(server.requests) == 1
    assert not list(tmp_path.rglob("*.txt"))


def test_object_store_urls_use_mirrors_with_the_bucket_as_host(tmp_path):
    # An offline machine reads s3:// corpus files from the same HOST/PATH mirror layout.
    assert mirror_candidates("s3://corpora/de-en/a.tsv", [str(tmp_path)]) == [
        (tmp_path / "corpora/de-en/a.tsv").as_uri(),
        "s3://corpora/de-en/a.tsv",
    ]
