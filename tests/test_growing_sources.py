"""Growing corpora: a corpus entry that names a set of train files (a glob, a folder prefix or
a manifest), listed once per run and frozen as a corpus version.

Each test reads as an example of use: a folder (or bucket) where new train files land, what a
run sees, what it downloads and the version it records.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from seqmodels.config import ConfigError, load_config
from seqmodels.data.download import ChecksumMismatchError, download_file
from seqmodels.data.settings import CleanConfig, CorpusConfig, SourceFile
from seqmodels.data.sources import (
    EntryFiles,
    FetchedFile,
    ResolvedCorpus,
    SourceError,
    VersionFile,
    fetch_listed,
    list_source,
    read_corpus_version,
    resolve_corpus,
)
from tests.test_corpus_updates import write_rows  # settled jsonl files of {text} rows


def incoming(folder: Path, **settings) -> SourceFile:
    """The growing entry `file:///.../incoming/*.jsonl` of a monolingual corpus."""
    return SourceFile(
        url=folder.as_uri() + "/*.jsonl",
        split="train",
        format="jsonl",
        fields={"text": "text"},
        **{"trust_listing": True, **settings},
    )


def download(corpus: CorpusConfig, cache: Path, mirrors: list[str] | None = None):
    """What the download stage does, without Prefect: list each growing entry once, fetch
    its files (and the pinned ones), resolve the union and freeze its version."""
    entries = []
    for source in corpus.files:
        if source.is_growing:
            listing = list_source(source, cache, mirrors)
            fetched = tuple(fetch_listed(f, source, cache, mirrors) for f in listing.files)
            entries.append(EntryFiles(source, fetched, listing))
        else:
            path = download_file(source.url, source.sha256, cache, mirrors)
            entries.append(EntryFiles(source, (FetchedFile(source.url, str(path)),)))
    return resolve_corpus(corpus, entries)


def monolingual(*files: SourceFile) -> CorpusConfig:
    return CorpusConfig(kind="monolingual", files=list(files))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_glob_is_listed_sorted_and_frozen_as_a_version(tmp_path):
    folder = tmp_path / "incoming"
    write_rows(folder, "b.jsonl", ["the second file"])
    write_rows(folder, "a.jsonl", ["the first file", "and its second line"])
    write_rows(folder, "notes.txt", ["not matched by *.jsonl"])
    corpus = monolingual(incoming(folder))

    first = download(corpus, tmp_path / "cache")
    assert [f.url for f in first.version.files] == [
        (folder / "a.jsonl").as_uri(),
        (folder / "b.jsonl").as_uri(),
    ]
    a = first.version.files[0]
    assert (a.size, a.sha256) == (
        (folder / "a.jsonl").stat().st_size,
        sha256_of(folder / "a.jsonl"),
    )
    # The union goes on as pinned files: each with its real digest and the entry's settings.
    assert [f.sha256 for f in first.corpus.files] == [f.sha256 for f in first.version.files]
    assert all(f.format == "jsonl" and f.split == "train" for f in first.corpus.files)
    assert len(first.version.digest) == 16
    # Listing again, with nothing new, gives the same version.
    assert download(corpus, tmp_path / "cache").version == first.version
    assert first.version.changes_since(first.version).added == ()


def test_a_new_file_makes_a_version_with_only_it_added_and_only_it_downloaded(tmp_path):
    folder, cache = tmp_path / "incoming", tmp_path / "cache"
    write_rows(folder, "2026-01.jsonl", ["january"])
    write_rows(folder, "2026-02.jsonl", ["february"])
    corpus = monolingual(incoming(folder))
    version_a = download(corpus, cache).version

    new = write_rows(folder, "2026-03.jsonl", ["march"])
    resolved = download(corpus, cache)
    version_b = resolved.version

    changes = version_b.changes_since(version_a)
    assert changes.added == (VersionFile(new.as_uri(), new.stat().st_size, sha256_of(new)),)
    assert changes.removed == ()
    assert version_b.digest != version_a.digest
    (summary,) = resolved.sources
    assert (summary.files, summary.downloaded, summary.checksums) == (3, 1, "trust_listing")
    # The cache holds each file once, under its digest; the old ones were not fetched again.
    assert sorted(p.parent.name for p in cache.glob("*/*.jsonl")) == sorted(
        f.sha256 for f in version_b.files
    )


def test_a_file_still_being_written_is_left_for_the_next_run(tmp_path):
    folder = tmp_path / "incoming"
    write_rows(folder, "done.jsonl", ["complete"])
    copying = write_rows(folder, "copying.jsonl", ["half of it"], age=5)
    write_rows(folder, ".upload.jsonl.part", ["a hidden partial file is never listed"], age=5)
    source = incoming(folder, settle_seconds=60)

    listing = list_source(source, tmp_path / "cache")
    assert [f.url for f in listing.files] == [(folder / "done.jsonl").as_uri()]
    assert listing.unsettled == (copying.as_uri(),)
    resolved = download(monolingual(source), tmp_path / "cache")
    assert resolved.sources[0].left_for_next_run == (copying.as_uri(),)
    assert len(resolved.version.files) == 1

    # A minute later it has settled, and the next run reads it.
    later = list_source(source, tmp_path / "cache", now=time.time() + 60)
    assert [f.url for f in later.files] == [copying.as_uri(), (folder / "done.jsonl").as_uri()]


def test_a_folder_prefix_lists_every_file_under_it(tmp_path):
    folder = tmp_path / "incoming"
    write_rows(folder, "2026/01/part-0.jsonl", ["deep"])
    write_rows(folder, "top.jsonl", ["top"])
    source = SourceFile(
        url=folder.as_uri() + "/",
        split="train",
        format="jsonl",
        fields={"text": "text"},
        trust_listing=True,
    )
    assert source.listing == "prefix"
    listing = list_source(source, tmp_path / "cache")
    assert [f.url.removeprefix(folder.as_uri()) for f in listing.files] == [
        "/2026/01/part-0.jsonl",
        "/top.jsonl",
    ]


@pytest.fixture()
def http_folder(tmp_path):
    """A loopback HTTP server serving tmp_path/www; yields (folder, base_url)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: Quiet(*a, directory=str(www), **k)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def manifest_entry(base: str) -> SourceFile:
    return SourceFile(
        url=f"{base}/de-en/manifest.json",
        manifest=True,
        split="train",
        format="jsonl",
        fields={"text": "text"},
    )


def test_a_manifest_over_http_lists_files_with_their_sha256(tmp_path, http_folder):
    www, base = http_folder
    one = write_rows(www / "de-en", "part-1.jsonl", ["eins"])
    two = write_rows(www / "de-en", "part-2.jsonl", ["zwei"])
    files = [{"path": p.name, "sha256": sha256_of(p), "size": p.stat().st_size} for p in (one, two)]
    (www / "de-en" / "manifest.json").write_text(json.dumps({"files": files}))

    resolved = download(monolingual(manifest_entry(base)), tmp_path / "cache")
    assert [(f.url, f.sha256) for f in resolved.version.files] == [
        (f"{base}/de-en/part-1.jsonl", sha256_of(one)),
        (f"{base}/de-en/part-2.jsonl", sha256_of(two)),
    ]
    assert resolved.sources[0].checksums == "manifest"


def test_a_wrong_sha256_in_the_manifest_is_an_error_naming_the_file(tmp_path, http_folder):
    www, base = http_folder
    part = write_rows(www / "de-en", "part-1.jsonl", ["eins"])
    entry = {"path": "part-1.jsonl", "sha256": "0" * 64}
    (www / "de-en" / "manifest.json").write_text(json.dumps({"files": [entry]}))

    with pytest.raises(ChecksumMismatchError, match=rf"{base}/de-en/part-1.jsonl") as caught:
        download(monolingual(manifest_entry(base)), tmp_path / "cache")
    assert caught.value.actual == sha256_of(part)
    assert not list((tmp_path / "cache").glob("*/part-1.jsonl"))  # nothing kept


def test_a_manifest_file_without_sha256_needs_trust_listing(tmp_path, http_folder):
    www, base = http_folder
    write_rows(www / "de-en", "part-1.jsonl", ["eins"])
    (www / "de-en" / "manifest.json").write_text(json.dumps({"files": [{"path": "part-1.jsonl"}]}))
    with pytest.raises(SourceError, match=r"part-1.jsonl has no sha256.*trust_listing: true"):
        download(monolingual(manifest_entry(base)), tmp_path / "cache")


CONFIG = """
require_checksums: %s
experiments:
  lm:
    task: language_model
    corpus:
      kind: monolingual
      files:
        - {url: "https://example.org/test.txt", sha256: "%s", split: test}
        - {url: "file:///data/incoming/*.txt", %s}
    models:
      m: {type: ngram, architecture: {order: 3}}
"""


@pytest.mark.parametrize(
    ("required", "growing", "expected"),
    [
        ("false", "split: test", r"lm.corpus.files.1: .*incoming/\*.txt: split: a growing entry"),
        ("false", "split: valid", r"incoming/\*.txt: split: .*valid and test stay pinned"),
        (
            "true",
            "split: train",
            r"files.1: file:///data/incoming/\*.txt: trust_listing: .*add `manifest: true`"
            r".*or `trust_listing: true`",
        ),
        ("false", "split: train, sha256: " + "a" * 64, r"incoming/\*.txt: sha256 pins one file"),
    ],
)
def test_config_errors_name_the_file_and_the_field(tmp_path, required, growing, expected):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG % (required, "b" * 64, growing))
    with pytest.raises(ConfigError, match=rf"(?s)c.yaml: invalid.*{expected}"):
        load_config(path)


def test_a_growing_entry_with_trust_listing_passes_require_checksums(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG % ("true", "b" * 64, "split: train, trust_listing: true"))
    (test_file, growing) = load_config(path).experiments["lm"].corpus.files
    assert (test_file.is_growing, growing.listing, growing.settle) == (False, "glob", 60.0)


def test_settings_of_growing_entries_are_refused_on_a_pinned_file():
    with pytest.raises(ValueError, match="a.txt: trust_listing is for growing entries"):
        SourceFile(url="https://example.org/a.txt", trust_listing=True)


# S3 through a real S3 API: moto's server on 127.0.0.1, s3fs pointed at it.
@pytest.fixture()
def s3(monkeypatch):
    """A moto S3 server on a free loopback port, with fake credentials. Yields the
    storage_options that point s3fs at it (how a user names an S3-compatible endpoint) and an
    S3FileSystem to put objects with."""
    s3fs = pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    yield options, s3fs.S3FileSystem(**options, skip_instance_cache=True)
    server.stop()


def test_a_glob_on_s3_is_listed_and_fetched_through_s3fs(tmp_path, s3):
    options, fs = s3
    fs.mkdir("corpora")
    fs.pipe("corpora/de-en/2026-01.tsv", b"de\ten\nHallo Welt\tHello world\n")
    fs.pipe("corpora/de-en/2026-02.tsv", b"de\ten\nGuten Tag\tGood day\n")
    fs.pipe("corpora/de-en/readme.md", b"# not a corpus file\n")
    entry = dict(
        url="s3://corpora/de-en/*.tsv",
        split="train",
        format="tsv",
        fields={"de": "de", "en": "en"},
        trust_listing=True,
        storage_options=options,
    )
    corpus = CorpusConfig(
        kind="parallel",
        src_lang="de",
        tgt_lang="en",
        files=[SourceFile(**entry, settle_seconds=0)],
    )

    resolved = download(corpus, tmp_path / "cache")
    assert [f.url for f in resolved.version.files] == [
        "s3://corpora/de-en/2026-01.tsv",
        "s3://corpora/de-en/2026-02.tsv",
    ]
    cached = Path(resolved.raw_paths[0])
    assert cached.read_bytes() == b"de\ten\nHallo Welt\tHello world\n"
    assert cached.parent.name == hashlib.sha256(cached.read_bytes()).hexdigest()
    # Objects just uploaded have not settled under the default minute: all left for later.
    listing = list_source(SourceFile(**entry), tmp_path / "cache")
    assert (listing.files, len(listing.unsettled)) == ((), 2)


def test_a_pinned_s3_file_is_downloaded_and_checked(tmp_path, s3):
    options, fs = s3
    fs.mkdir("pinned")
    fs.pipe("pinned/test.txt", b"a pinned test line\n")
    digest = hashlib.sha256(b"a pinned test line\n").hexdigest()
    path = download_file("s3://pinned/test.txt", digest, tmp_path, storage_options=options)
    assert path == tmp_path / digest / "test.txt"
    with pytest.raises(ChecksumMismatchError, match="s3://pinned/test.txt"):
        download_file("s3://pinned/test.txt", "0" * 64, tmp_path / "c2", storage_options=options)


def run_data_stages(corpus: CorpusConfig, clean: CleanConfig, work: Path):
    """The pipeline's download and clean stages, as Prefect flows, the way experiment_flow
    calls them."""
    from flows.stages import clean_stage, download_stage

    resolved: ResolvedCorpus = download_stage(
        "lm", corpus, mirrors=[], cache_dir=str(work / "downloads"), workspace="ws"
    )
    data = clean_stage("lm", resolved, clean=clean, work_dir=str(work / "lm"), workspace="ws")
    return resolved, data


def test_the_data_stages_clean_the_union_and_record_the_corpus_version(prefect_api, tmp_path):
    folder = tmp_path / "incoming"
    write_rows(folder, "a.jsonl", ["the cat sat on the mat", "a dog ran in the park"])
    # A duplicate across files and a test sentence: de-duplication and the eval-overlap rule
    # run over the union of every file.
    write_rows(folder, "b.jsonl", ["the cat sat on the mat", "held out for the test"])
    test = tmp_path / "pinned" / "test.txt"
    test.parent.mkdir()
    test.write_text("held out for the test\n")
    corpus = monolingual(
        incoming(folder),
        SourceFile(url=test.as_uri(), sha256=sha256_of(test), split="test"),
    )
    clean = CleanConfig(min_letter_fraction=None)

    resolved, data = run_data_stages(corpus, clean, tmp_path / "runs")
    rows = pl.read_parquet(data["parquet"])
    train = rows.filter(pl.col("split") == "train")
    assert sorted(train["text"]) == ["a dog ran in the park", "the cat sat on the mat"]
    assert rows.filter(pl.col("split") == "test")["text"].to_list() == ["held out for the test"]

    version_json = Path(data["corpus_version"])
    assert version_json.parent == Path(data["report_json"]).parent
    assert read_corpus_version(version_json) == resolved.version
    assert len(resolved.version.files) == 3  # the pinned test file is part of the version
    report = json.loads(Path(data["report_json"]).read_text())
    assert report["corpus_version"]["digest"] == resolved.version.digest
    assert report["corpus_version"]["files"] == 3
    assert report["corpus_version"]["sources"][0]["checksums"] == "trust_listing"
    assert "trust_listing: no manifest" in Path(data["report_md"]).read_text()

    # Next month's file lands: the next run reads the union of three train files.
    write_rows(folder, "c.jsonl", ["a bird sang in the tree"])
    again, data = run_data_stages(corpus, clean, tmp_path / "runs")
    assert [f.url for f in again.version.changes_since(resolved.version).added] == [
        (folder / "c.jsonl").as_uri()
    ]
    train = pl.read_parquet(data["parquet"]).filter(pl.col("split") == "train")
    assert train.height == 3
