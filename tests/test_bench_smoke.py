"""The throughput benchmarks still run: each script with --smoke (tiny models, one or two
steps) ends with one JSON line holding the expected figures. Hugging Face is compared only
where transformers is installed (CI installs `.[dev]`, without it)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

HAS_HF = importlib.util.find_spec("transformers") is not None
HAS_CT2 = importlib.util.find_spec("ctranslate2") is not None


def run_bench(script: str, mirror, tmp_path, *options: str, compares_hf: bool = True) -> dict:
    args = [sys.executable, str(REPO / "bench" / script), "--smoke", "--device", "cpu", *options]
    if compares_hf and not HAS_HF and "--no-hf" not in options:
        args.append("--no-hf")
    env = {**os.environ, "SEQMODELS_MIRROR": str(mirror), "TMPDIR": str(tmp_path)}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["device"].startswith("cpu")
    assert figures["sizes"] == "smoke" and figures["reduced"] is True
    return figures


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


@pytest.fixture(scope="module")
def bench_tmp(tmp_path_factory):
    # One temp folder for both scripts: the SentencePiece model is trained once.
    return tmp_path_factory.mktemp("bench")


def test_train_throughput_smoke(mirror, bench_tmp):
    figures = run_bench("train_throughput.py", mirror, bench_tmp)
    assert figures["bench"] == "train_throughput"
    assert positive(figures["peak_tflops"])
    assert set(figures["models"]) == {"seq2seq", "lm", "lstm"}
    for name, m in figures["models"].items():
        for key in ("seqmodels_tokens_per_s", "plain_tokens_per_s", "seqmodels_mfu"):
            assert positive(m[key]), (name, key, m[key])
        assert positive(m["seqmodels_vs_plain"])
        assert positive(m["seqmodels_trainer_reported_tokens_per_s"])
        has_hf = HAS_HF and name != "lstm"  # no Hugging Face LSTM LM
        assert positive(m["hf_tokens_per_s"]) == has_hf, (name, m["hf_tokens_per_s"])
        assert positive(m["seqmodels_vs_hf"]) == has_hf


def test_decode_throughput_smoke(mirror, bench_tmp):
    figures = run_bench("decode_throughput.py", mirror, bench_tmp)
    assert figures["bench"] == "decode_throughput"
    assert figures["beam"] == 5 and figures["sentences"] == 8
    for key in ("seqmodels_sentences_per_s", "seqmodels_tokens_per_s", "output_positions"):
        assert positive(figures[key]), key
    assert positive(figures["hf_tokens_per_s"]) == HAS_HF
    assert positive(figures["seqmodels_vs_hf"]) == HAS_HF


@pytest.mark.skipif(not HAS_CT2, reason="needs ctranslate2 (the `export` extra)")
@pytest.mark.parametrize("replicas", [1, 2])  # 2: CTranslate2's throughput layout
def test_decode_throughput_smoke_times_ctranslate2_in_rounds(mirror, bench_tmp, replicas):
    options = ["--no-hf", "--rounds", "2", "--ct2-replicas", str(replicas)]
    figures = run_bench("decode_throughput.py", mirror, bench_tmp, *options)
    assert figures["rounds"] == 2 and figures["ctranslate2"]
    assert figures["ct2_replicas"] == replicas
    for impl in ("ct2_float32", "ct2_int8"):
        low, high = figures[f"{impl}_tokens_per_s_spread"]
        assert 0 < low <= figures[f"{impl}_tokens_per_s"] <= high, impl
        assert positive(figures[f"{impl}_vs_seqmodels"]), impl


@pytest.mark.skipif(not HAS_CT2, reason="needs ctranslate2 (the `export` extra)")
def test_ct2_serving_smoke_times_each_replica_layout_in_rounds(mirror, bench_tmp):
    figures = run_bench("ct2_serving.py", mirror, bench_tmp, "--rounds", "2", compares_hf=False)
    assert figures["bench"] == "ct2_serving" and figures["sentences"] == 8
    for q in ("int8", "float32"):
        for n in (1, 2):
            seconds = figures["seconds"][f"{q}_replicas_{n}"]
            assert len(seconds) == 2 and all(positive(x) for x in seconds), (q, n)
        assert positive(figures[f"{q}_replicas_2_vs_1"])
        assert positive(figures["output_words"][q])  # the same under both layouts


def test_ct2_serving_refuses_a_layout_the_predictor_would_refuse():
    args = [sys.executable, str(REPO / "bench" / "ct2_serving.py"), "--replicas", "1,0"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--replicas must all be at least 1, got [1, 0]" in result.stderr
    args = [sys.executable, str(REPO / "bench" / "ct2_serving.py"), "--replicas", "1,2"]
    result = subprocess.run([*args, "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "1 threads (SEQMODELS_CT2_THREADS) cannot run 2 replicas" in result.stderr


def test_decode_throughput_refuses_zero_ctranslate2_replicas():
    args = [sys.executable, str(REPO / "bench" / "decode_throughput.py"), "--ct2-replicas", "0"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--ct2-replicas must be at least 1, got 0" in result.stderr


@pytest.mark.skipif(
    not (HAS_HF and importlib.util.find_spec("accelerate")),
    reason="needs transformers and accelerate (the Hugging Face Trainer)",
)
def test_hf_finetune_throughput_smoke(mirror, bench_tmp):
    figures = run_bench("hf_finetune_throughput.py", mirror, bench_tmp)
    assert figures["bench"] == "hf_finetune_throughput"
    assert figures["rounds"] == 1 and figures["timed_steps"] == 1
    assert set(figures["models"]) == {"gpt2", "marian"}
    for name, m in figures["models"].items():
        for impl in ("seqmodels", "hf"):
            assert positive(m[f"{impl}_tokens_per_s"]["median"]), (name, impl)
        assert positive(m["seqmodels_vs_hf"]), name


def test_clean_throughput_keeps_the_same_rows_as_pandas_and_datasets(mirror, tmp_path):
    # The contenders only compare if they clean alike: each must keep exactly Polars' rows.
    args = [sys.executable, str(REPO / "bench" / "clean_throughput.py"), "--lines", "20000"]
    args += ["--hf-lines", "20000", "--workdir", str(tmp_path)]
    env = {**os.environ, "SEQMODELS_MIRROR": str(mirror)}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["same_rows_as_pandas"] and figures["same_rows_as_datasets"]
    assert sum(figures["polars"]["rows_out"].values()) > 15000  # most of 20k pairs survive
    for name in ("polars", "pandas", "polars_small", "datasets"):
        assert positive(figures[name]["wall_s"]["median"]), name
    assert positive(figures["pandas_over_polars"]) and positive(figures["datasets_over_polars"])
