"""bench/gpu_suite.py, the one command a lent GPU runs: its prepared folder, the manifest
check, a --quick run on the CPU without prefect/mlflow/polars (as on the bare GPU machine),
and the per-part budget guard."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

SUITE = REPO / "bench" / "gpu_suite.py"
spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
gpu_suite = importlib.util.module_from_spec(spec)
sys.modules["gpu_suite"] = gpu_suite  # its dataclasses look their module up
spec.loader.exec_module(gpu_suite)

# Runs the suite the way the GPU machine would, except that importing prefect, mlflow or
# polars (anywhere, by anything) raises ImportError: they are not installed there.
BARE_MACHINE = """
import runpy, sys
for name in ("prefect", "mlflow", "polars"):
    sys.modules[name] = None
sys.argv = [{suite!r}, *sys.argv[1:]]
runpy.run_path({suite!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mirror):
    out = tmp_path_factory.mktemp("gpu-inputs")
    os.environ.setdefault("SEQMODELS_MIRROR", str(mirror))
    manifest = gpu_suite.prepare(out, quick=True)
    return out, manifest


def test_prepare_writes_a_small_folder_with_a_manifest(prepared):
    folder, manifest = prepared
    assert set(manifest["files"]) == {
        gpu_suite.MT_PARQUET,
        gpu_suite.LM_PARQUET,
        gpu_suite.MT_SPM,
        gpu_suite.BENCH_SPM,
        gpu_suite.LM_SPM,
    }
    assert manifest["bytes"] < 8 * 2**20
    assert gpu_suite.check_inputs(folder)["files"] == manifest["files"]


def test_manifest_check_names_the_missing_or_changed_file(prepared, tmp_path):
    folder, _ = prepared
    copy = tmp_path / "inputs"
    shutil.copytree(folder, copy)
    with open(copy / gpu_suite.LM_SPM, "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match=f"{gpu_suite.LM_SPM}: changed"):
        gpu_suite.check_inputs(copy)
    (copy / gpu_suite.MT_PARQUET).unlink()
    with pytest.raises(ValueError, match=f"{gpu_suite.MT_PARQUET}: missing"):
        gpu_suite.check_inputs(copy)
    (copy / gpu_suite.MANIFEST).unlink()
    with pytest.raises(ValueError, match="manifest.json: missing"):
        gpu_suite.check_inputs(copy)


def test_quick_run_on_a_machine_without_prefect_mlflow_polars(prepared, tmp_path):
    folder, _ = prepared
    code = BARE_MACHINE.format(suite=str(SUITE))
    args = [sys.executable, "-c", code, "run", "--inputs", str(folder), "--quick"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    parts, summary = lines[:-1], lines[-1]
    assert [p["part"] for p in parts] == list(gpu_suite.PARTS)
    assert summary["summary"] and set(summary["status"].values()) == {"ok"}, summary
    for part in parts:
        assert part["device"].startswith("cpu") and part["torch"] and part["sacrebleu"]
        assert part["status"] == "ok" and part["seconds"] <= part["budget_s"] + 1
    by_name = {p["part"]: p for p in parts}
    for shape in ("train_seq2seq", "train_lm", "train_lstm"):
        assert by_name[shape]["seqmodels_tokens_per_s"] > 0
        assert by_name[shape]["plain_tokens_per_s"] > 0
    assert by_name["beam"]["seqmodels_sentences_per_s"] > 0
    assert 0 <= by_name["mt"]["bleu"] <= 100 and by_name["mt"]["test_sentences"] == 8
    assert by_name["lm"]["bits_per_char"] > 0
    if importlib.util.find_spec("ctranslate2"):  # the export extra: exported and timed
        assert by_name["beam"]["ctranslate2_seconds"] > 0
        assert by_name["beam"]["ctranslate2_quantization"] == "int8"
    else:
        assert by_name["beam"]["ctranslate2_status"].startswith("skipped: ")


def test_a_part_over_its_budget_is_reported_and_the_rest_still_run(prepared, monkeypatch, capsys):
    folder, _ = prepared

    def endless(suite, budget_s):
        while True:
            pass

    def quick(suite, budget_s):
        return {"answer": 42}

    monkeypatch.setitem(gpu_suite.PARTS, "endless", endless)
    monkeypatch.setitem(gpu_suite.PARTS, "quick", quick)
    monkeypatch.setitem(gpu_suite.BUDGET_SHARES, "endless", 0.01)
    monkeypatch.setitem(gpu_suite.BUDGET_SHARES, "quick", 0.01)
    args = ["run", "--inputs", str(folder), "--quick", "--budget-s", "20"]
    gpu_suite.main([*args, "--parts", "endless,quick", "--part-budget", "endless=0.5"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["part"] == "endless" and lines[0]["status"] == "over_budget"
    assert lines[0]["budget_s"] == 0.5
    assert lines[1] == {**lines[1], "part": "quick", "status": "ok", "answer": 42}
    assert lines[2]["status"] == {"endless": "over_budget", "quick": "ok"}


def test_a_ctranslate2_that_cannot_load_on_the_device_leaves_the_beam_figures(
    prepared, monkeypatch, capsys
):
    # The GPU image's CUDA may not be the one the ctranslate2 wheel was built for (4.8.5
    # opens libcublas.so.12); then the comparison says why, and seqmodels' figures stay.
    pytest.importorskip("ctranslate2")
    import ctranslate2

    def translator_without_cublas(*args, **kwargs):
        raise RuntimeError("Library libcublas.so.12 is not found or cannot be loaded")

    monkeypatch.setattr(ctranslate2, "Translator", translator_without_cublas)
    folder, _ = prepared
    gpu_suite.main(["run", "--inputs", str(folder), "--quick", "--parts", "beam"])
    beam = json.loads(capsys.readouterr().out.splitlines()[0])
    assert beam["status"] == "ok" and beam["seqmodels_sentences_per_s"] > 0
    assert beam["ctranslate2_status"] == (
        "error: RuntimeError: Library libcublas.so.12 is not found or cannot be loaded"
    )


def test_compile_reaches_every_training_throughput_contender(prepared, monkeypatch, capsys):
    import train_throughput  # bench/, on the path gpu_suite sets

    seen = []

    def bench_model(shape, size, args, device, data, *, spm_path):
        seen.append((shape, args.compile))
        return {"seqmodels_tokens_per_s": 1.0}

    monkeypatch.setattr(train_throughput, "bench_model", bench_model)
    folder, _ = prepared
    parts = "train_seq2seq,train_lm"
    gpu_suite.main(["run", "--inputs", str(folder), "--quick", "--parts", parts, "--compile"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert seen == [("seq2seq", True), ("lm", True)]
    assert [line.get("compile") for line in lines[:2]] == [True, True]
