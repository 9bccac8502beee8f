"""Shared fixtures: the corpus mirror, a loopback HTTP server with fault injection, and an
isolated Prefect/MLflow environment per test session."""

from __future__ import annotations

import http.server
import os
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get("SEQMODELS_TEST_MIRROR", REPO.parent / "shared" / "corpora")).resolve()
SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e"
    "/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
MULTI30K = (
    "https://raw.githubusercontent.com/multi30k/dataset/a3d2e0d26b56f3846f66a952536ffed4e401d05a"
    "/data/task1/raw/"
)


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not (MIRROR / "SHA256SUMS").exists():
        pytest.fail(f"corpus mirror not found at {MIRROR}; set SEQMODELS_TEST_MIRROR")
    return MIRROR


@pytest.fixture(scope="session", autouse=True)
def isolated_services(tmp_path_factory):
    """Every test session gets its own Prefect home and no external servers."""
    home = tmp_path_factory.mktemp("prefect-home")
    saved = dict(os.environ)
    os.environ.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="true",
        MLFLOW_DISABLE_TELEMETRY="true",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=os.environ.get(
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"
        ),
    )
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "SEQMODELS_MIRROR"):
        os.environ.pop(key, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module", autouse=True)
def mlflow_uris_reset():
    """MLflow keeps the tracking and registry URIs of in-process tasks in globals and copies
    them into the environment (for subprocesses): reset both after each module, or a later
    module's MlflowClient(tracking_uri=...) reads the registry of an earlier one."""
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(key, None)


@pytest.fixture(scope="session")
def prefect_api(isolated_services):
    """A Prefect API for tests that call tasks directly (artifacts need one)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


class FaultyMirrorHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the mirror folder; `server.faults[path]` scripts failures for a path:
    a list consumed one request at a time, each "503", "404", "429", "drop" (send half the body
    then close the connection), "truncate" (a complete response holding only the first 60% of
    the file), "slow" (wait 3 s before answering) or "ok"."""

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Range")))
        plan = self.server.faults.get(self.path)
        action = plan.pop(0) if plan else "ok"
        if action in ("503", "404", "429"):
            self.send_error(int(action))
            return
        if action == "slow":
            time.sleep(3)
        if action == "truncate":
            data = Path(self.translate_path(self.path)).read_bytes()
            data = data[: len(data) * 6 // 10]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if action == "drop":
            path = Path(self.translate_path(self.path))
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        range_header = self.headers.get("Range")
        if range_header:
            path = Path(self.translate_path(self.path))
            data = path.read_bytes()
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])
            return
        super().do_GET()


@pytest.fixture()
def http_mirror(mirror):
    """A real HTTP server on 127.0.0.1 serving the mirror; yields (base_url, server)."""

    def handler(*args, **kwargs):
        return FaultyMirrorHandler(*args, directory=str(mirror), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.faults, server.requests = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()


@pytest.fixture()
def tiny_ngram_dir(tmp_path):
    """A real, finished 3-gram model folder (tmp_path/model) trained on a tiny text; its
    cleaned Parquet is tmp_path/clean/corpus.parquet."""
    from seqmodels.config import CleanConfig, VocabConfig, parse_model_spec
    from seqmodels.data.clean import InputFile, clean_corpus
    from seqmodels.data.vocab import train_sentencepiece
    from seqmodels.models.folder import train_model

    text = tmp_path / "t.txt"
    text.write_text(
        "".join(f"ROMEO: the night is {w} and long\n" for w in ["dark", "cold", "young"] * 40)
    )
    parquet, _ = clean_corpus(
        [InputFile(text, "u/t.txt")],
        tmp_path / "clean",
        CleanConfig(deduplicate=False, remove_eval_overlap=False),
        "monolingual",
    )
    spm = train_sentencepiece(parquet, ["text"], tmp_path / "vocab", VocabConfig(vocab_size=40))
    out = tmp_path / "model"
    train_model(
        parse_model_spec({"type": "ngram", "architecture": {"order": 3}}),
        "language_model",
        parquet,
        spm,
        out,
    )
    return out


@pytest.fixture()
def single_thread_torch():
    """Tiny models run fastest single-threaded, and on a busy shared CPU spinning OpenMP
    threads are very slow; the default is restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
