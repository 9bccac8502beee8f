"""The trainer's checkpoints, exact resume, accumulation, early stopping, averaging, MFU and
data parallelism, on tiny models (a few seconds each on 2 CPU cores)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from seqmodels import EOS_ID
from seqmodels.inference.predictors import NeuralLMPredictor
from seqmodels.models.folder import load_predictor
from seqmodels.models.lstm_seq2seq import LSTMSeq2SeqArchitecture
from seqmodels.models.transformer_lm import TransformerLMArchitecture
from seqmodels.models.transformer_seq2seq import ENCODER_PREFIXES, TransformerSeq2SeqArchitecture
from seqmodels.torchrun import run_spec, save_pairs
from seqmodels.training import flops, trainer
from seqmodels.training.batching import LMBatches, PairBatches, prepare_pairs
from seqmodels.training.checkpoint import (
    average_state_dicts,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
)
from seqmodels.training.flops import matmul_params
from seqmodels.training.settings import LMTrainSettings, Seq2SeqTrainSettings
from tests.conftest import REPO
from tests.model_helpers import FamilyArch, build, train_lm, train_s2s

V = 24
# Dropout on, so exact resume also needs the torch RNG state restored.
LM = FamilyArch(
    "transformer_lm",
    TransformerLMArchitecture(block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64, dropout=0.1),
)
LM_NO_DROPOUT = FamilyArch(
    "transformer_lm",
    TransformerLMArchitecture(block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64, dropout=0.0),
)
S2S = FamilyArch(
    "lstm_seq2seq", LSTMSeq2SeqArchitecture(emb_dim=16, enc_hidden=16, dec_hidden=32, dropout=0.2)
)
PEAK = 1e11  # SEQMODELS_PEAK_FLOPS in these tests: no benchmark run


@pytest.fixture(autouse=True)
def one_thread(single_thread_torch):
    """Every test here runs torch single-threaded (see conftest.single_thread_torch)."""


@pytest.fixture(autouse=True)
def fixed_peak(monkeypatch):
    monkeypatch.setenv("SEQMODELS_PEAK_FLOPS", str(PEAK))


def lm_stream(n_lines: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = [EOS_ID]
    for _ in range(n_lines):
        start = int(rng.integers(0, 8))
        ids += [4 + (start + i) % 8 for i in range(int(rng.integers(3, 9)))] + [EOS_ID]
    return np.array(ids, dtype=np.int32)


def copy_pairs(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = rng.integers(4, 16, int(rng.integers(2, 7))).astype(np.int32)
        out.append((s, s[::-1].copy()))
    return out


def lm_cfg(**kw) -> LMTrainSettings:
    base = dict(max_steps=24, batch_tokens=64, block_size=16, lr=5e-3, warmup_steps=4)
    return LMTrainSettings(**{**base, "eval_every": 6, "log_every": 1, **kw})


# --- jobs shared by the test process and the subprocess it kills ------------------------


def lm_job(out_dir: Path, on_metrics=None):
    return train_lm(
        LM,
        V,
        lm_stream(150, 0),
        valid_ids=lm_stream(15, 1),
        cfg=lm_cfg(),
        out_dir=out_dir,
        on_metrics=on_metrics,
    )


def s2s_job(out_dir: Path, on_metrics=None):
    cfg = Seq2SeqTrainSettings(
        max_steps=24, batch_tokens=48, lr=1e-2, warmup_steps=4, eval_every=6, log_every=1
    )
    return train_s2s(
        S2S,
        V,
        copy_pairs(120, 0),
        valid_pairs=copy_pairs(12, 1),
        cfg=cfg,
        out_dir=out_dir,
        on_metrics=on_metrics,
    )


JOBS = {"lm": lm_job, "s2s": s2s_job}

KILLED_CHILD = """
import sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
from tests.test_training import JOBS
# Slow down each step (the callback does not touch the weights) so the kill lands mid-run.
JOBS[{job!r}]({out!r}, on_metrics=lambda m, step: time.sleep(0.1))
"""


def final_weights(out_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    last = list_checkpoints(out_dir / "checkpoints")[-1][1]
    return {
        "model.pt": torch.load(out_dir / "model.pt", weights_only=True),
        "final": load_checkpoint(last)["model"],
    }


@pytest.mark.parametrize("job", JOBS)
def test_resume_after_sigkill_is_bit_identical(job, tmp_path):
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    code = KILLED_CHILD.format(repo=str(REPO), job=job, out=str(killed))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while not list_checkpoints(killed / "checkpoints"):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # it died mid-run, not after finishing
    proc.stderr.close()
    assert list_checkpoints(killed / "checkpoints")[-1][0] < 24

    reference = JOBS[job](tmp_path / "reference")
    resumed = JOBS[job](killed)
    assert reference.resumed_from_step == 0 and resumed.resumed_from_step >= 6
    assert resumed.steps == reference.steps == 24
    assert resumed.best_valid_loss == reference.best_valid_loss
    ref, got = final_weights(tmp_path / "reference"), final_weights(killed)
    for which in ref:
        assert ref[which].keys() == got[which].keys()
        for k in ref[which]:
            assert torch.equal(ref[which][k], got[which][k]), (which, k)


# --- checkpoints ---------------------------------------------------------------------------


def test_checkpoints_hold_the_full_state_and_load_weights_only(tmp_path):
    result = lm_job(tmp_path)
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    # Validations at 6, 12, 18, 24: keep_last=2 keeps 18 and 24, keep_best=1 the best one.
    assert [s for s, _ in ckpts][-2:] == [18, 24] and len(ckpts) <= 3
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    for step, path in ckpts:
        ck = torch.load(path, weights_only=True)
        assert ck["step"] == step and ck["schedule"]["step"] == step
        assert {"model", "optimizer", "scaler", "rng", "data", "progress", "config_hash"} <= set(ck)
        assert isinstance(ck["rng"]["torch"], torch.Tensor) and len(ck["rng"]["python"][1]) > 600
        assert ck["data"]["rng"]["bit_generator"] == "PCG64"
        assert ck["optimizer"]["state"] and ck["model"].keys() == build(LM, V).state_dict().keys()
    history = load_checkpoint(ckpts[-1][1])["progress"]["valid_metrics"]
    assert [s for s, _ in history] == [6, 12, 18, 24]
    assert -max(m for _, m in history) == pytest.approx(result.best_valid_loss)


def test_checkpoint_every_and_pruning(tmp_path):
    cfg = lm_cfg(max_steps=7, eval_every=100, checkpoint_every=3, keep_last=10)
    train_lm(LM, V, lm_stream(50, 0), valid_ids=lm_stream(5, 1), cfg=cfg, out_dir=tmp_path)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [3, 6, 7]

    d = tmp_path / "synthetic"
    d.mkdir()
    for s in range(1, 6):
        (d / f"step-{s:07d}.pt").write_bytes(b"x")
    metrics = {1: -3.0, 2: -1.0, 3: -2.0, 4: -2.5, 5: -4.0}  # higher is better: step 2 best
    prune_checkpoints(d, keep_last=2, keep_best=1, metrics=metrics)
    assert [s for s, _ in list_checkpoints(d)] == [2, 4, 5]
    prune_checkpoints(d, keep_last=1, keep_best=0, metrics=metrics)
    assert [s for s, _ in list_checkpoints(d)] == [5]


def test_changed_config_or_resume_false_starts_afresh(tmp_path):
    def train(data_seed: int = 0, **settings):
        return train_lm(
            LM,
            V,
            lm_stream(50, data_seed),
            valid_ids=lm_stream(5, 1),
            cfg=lm_cfg(**settings),
            out_dir=tmp_path,
        )

    train(max_steps=6)
    again = train(max_steps=12)
    assert again.resumed_from_step == 0  # max_steps shapes the schedule: not resumable
    longer = train(max_steps=12, log_every=3)  # only a resume-free field changed: continues
    assert longer.resumed_from_step == 12 and longer.steps == 12
    other_data = train(data_seed=2, max_steps=12)
    assert other_data.resumed_from_step == 0
    fresh = train(data_seed=2, max_steps=12, resume=False)
    assert fresh.resumed_from_step == 0


def test_batch_iterators_resume_and_shard(tmp_path):
    srcs, tgts = prepare_pairs(copy_pairs(40, 0), 100, truncate=False)
    for make in (
        lambda r, w: PairBatches(srcs, tgts, 40, seed=3, rank=r, world=w),
        lambda r, w: LMBatches(lm_stream(40, 0), 8, 4, seed=3, rank=r, world=w),
    ):
        it = make(0, 1)
        for _ in range(13):  # past an epoch boundary of the pair batches
            next(it)
        state = json.loads(json.dumps(it.state_dict()))  # plain data only
        expected = [next(it) for _ in range(9)]
        again = make(0, 1)
        again.load_state_dict(state)
        for (a, n), (b, m) in zip(expected, [next(again) for _ in range(9)], strict=True):
            assert n == m and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        # Two ranks see disjoint halves of the same global batch.
        whole, r0, r1 = make(0, 1), make(0, 2), make(1, 2)
        for _ in range(5):
            (b, n), (b0, n0), (b1, n1) = next(whole), next(r0), next(r1)
            assert n == n0 + n1 and len(b[0]) == len(b0[0]) + len(b1[0])

            # Padding differs between slices (LM targets: -100 past the end; pairs: none).
            def real(targets):
                return [y[(y != 0) & (y != -100)].tolist() for y in targets]

            rows = real(b[-1])
            assert rows[0::2] == real(b0[-1]) and rows[1::2] == real(b1[-1])


# --- accumulation, early stopping, averaging, compile -----------------------------------


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    def run(out, **kw):
        cfg = lm_cfg(max_steps=5, eval_every=5, checkpoint_every=0, **kw)
        seen = []
        train_lm(
            LM_NO_DROPOUT,
            V,
            lm_stream(80, 0),
            valid_ids=lm_stream(5, 1),
            cfg=cfg,
            out_dir=tmp_path / out,
            on_metrics=lambda m, s: "train_loss" in m and seen.append(m["train_loss"]),
        )
        return torch.load(tmp_path / out / "model.pt", weights_only=True), seen

    big, big_losses = run("big", batch_tokens=128)
    acc, acc_losses = run("acc", batch_tokens=64, grad_accum_steps=2)
    small, _ = run("small", batch_tokens=64)
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-4, atol=1e-5)
    assert big_losses == pytest.approx(acc_losses, rel=1e-5)
    assert any(not torch.allclose(small[k], big[k], atol=1e-4) for k in big)


TRANSFORMER_S2S = FamilyArch(
    "transformer_seq2seq",
    TransformerSeq2SeqArchitecture(
        d_model=32, n_head=2, n_enc_layers=1, n_dec_layers=1, d_ff=64, dropout=0.1
    ),
)
HOST_READS = ("__int__", "__float__", "__bool__", "__index__", "item", "tolist")


@pytest.mark.parametrize("family", ["transformer_lm", "transformer_seq2seq"])
def test_a_training_step_never_reads_a_tensor_back_to_the_host(family, tmp_path, monkeypatch):
    # On a GPU each read of a tensor's value waits for the queued kernels. torch's sync
    # debug mode found one such read per step on an H200 (the loss's token count). Reads
    # belong to the log interval (flush_interval), not to train_step.
    reads: list[str] = []
    in_step = [False]
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **kw):
            if in_step[0]:
                reads.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    train_step = trainer.TrainingRun.train_step

    def watched_step(run):
        in_step[0] = True
        try:
            train_step(run)
        finally:
            in_step[0] = False

    monkeypatch.setattr(trainer.TrainingRun, "train_step", watched_step)
    if family == "transformer_lm":
        cfg = lm_cfg(max_steps=4, eval_every=2)
        train_lm(
            LM, V, lm_stream(80, 0), valid_ids=lm_stream(5, 1), cfg=cfg, out_dir=tmp_path / family
        )
    else:
        cfg = Seq2SeqTrainSettings(max_steps=4, batch_tokens=48, eval_every=2, log_every=1)
        pairs = copy_pairs(60, 0)
        train_s2s(
            TRANSFORMER_S2S,
            V,
            pairs,
            valid_pairs=copy_pairs(6, 1),
            cfg=cfg,
            out_dir=tmp_path / family,
        )
    assert reads == []


def test_early_stopping_on_valid_loss(tmp_path, monkeypatch):
    # lr = 0: the validation loss never improves after the first validation. The settings
    # refuse lr <= 0 now, so the schedule is held at 0 instead (AdamW then changes nothing).
    monkeypatch.setattr(trainer, "lr_at", lambda step, cfg: 0.0)
    cfg = lm_cfg(max_steps=100, eval_every=2, early_stop_patience=2)
    result = train_lm(LM, V, lm_stream(50, 0), valid_ids=lm_stream(5, 1), cfg=cfg, out_dir=tmp_path)
    assert result.stopped_early and result.steps == 6


def test_early_stopping_and_best_weights_by_score_fn(tmp_path):
    scores = iter([1.0, 3.0, 2.0, 2.5, 0.0, 9.0])
    snapshots = []

    def score(model) -> float:
        assert not model.training
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    seen = []
    cfg = lm_cfg(max_steps=100, eval_every=2, early_stop_patience=2, keep_last=1, keep_best=1)
    result = train_lm(
        LM, V, lm_stream(50, 0), valid_ids=lm_stream(5, 1), cfg=cfg, out_dir=tmp_path,
        on_metrics=lambda m, s: seen.append(m), valid_score_fn=score,
    )  # fmt: skip
    assert result.steps == 8 and result.stopped_early and result.best_valid_score == 3.0
    assert any("valid_score" in m and "valid_loss" in m for m in seen)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], snapshots[1][k]) for k in saved)  # step 4: score 3
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [4, 8]


def test_average_state_dicts_is_the_mean():
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "n": torch.tensor(1)}
    b = {"w": torch.tensor([[3.0, 2.0], [1.0, 0.0]]), "n": torch.tensor(2)}
    avg = average_state_dicts([a, b])
    assert torch.equal(avg["w"], torch.tensor([[2.0, 2.0], [2.0, 2.0]]))
    assert avg["n"].item() == 2  # integer buffers: taken from the newest


def test_average_last_n_writes_averaged_model(tmp_path):
    cfg = lm_cfg(max_steps=8, eval_every=4, average_last_n=2, keep_last=1, keep_best=0)
    train_lm(LM, V, lm_stream(50, 0), valid_ids=lm_stream(5, 1), cfg=cfg, out_dir=tmp_path)
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in ckpts] == [4, 8]  # keep_last is raised to average_last_n
    m4, m8 = (load_checkpoint(p)["model"] for _, p in ckpts)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    for k in saved:
        torch.testing.assert_close(saved[k], (m4[k] + m8[k]) / 2)


def test_compile_is_off_by_default_and_saves_plain_weights(tmp_path, monkeypatch):
    assert LMTrainSettings().compile is False and Seq2SeqTrainSettings().compile is False
    calls = []

    def eager_compile(model, **kw):  # the eager backend: tracing only, no C++ toolchain
        calls.append(model)
        return real_compile(model, backend="eager")

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", eager_compile)
    cfg = lm_cfg(max_steps=2, eval_every=2, compile=True)
    started = time.perf_counter()
    train_lm(
        LM_NO_DROPOUT, V, lm_stream(30, 0), valid_ids=lm_stream(5, 1), cfg=cfg, out_dir=tmp_path
    )
    if time.perf_counter() - started > 60:
        pytest.skip("torch.compile too slow on this machine")
    assert len(calls) == 1
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    build(LM_NO_DROPOUT, V).load_state_dict(state)  # no "_orig_mod." prefixes


# --- FLOPs and MFU ----------------------------------------------------------------------


def test_flops_per_token_and_mfu_reporting(tmp_path, monkeypatch):
    model = build(LM, V)
    n_all = sum(p.numel() for p in model.parameters())
    n_pos = model.pos_emb.weight.numel()
    assert sum(matmul_params(model)) == n_all - n_pos  # tied tok_emb/head counted once
    expected = 6 * (n_all - n_pos) + 12 * LM.arch.n_layer * LM.arch.d_model * 16
    assert model.flops_per_token(16) == expected

    t = TransformerSeq2SeqArchitecture(d_model=16, n_head=2, d_ff=32)
    s2s = build(FamilyArch("transformer_seq2seq", t), V)
    assert ENCODER_PREFIXES == ("enc_", "encoder")
    enc, other = matmul_params(s2s, ENCODER_PREFIXES)
    # The logits are F.linear(x, tgt_emb.weight), so the shared table is a real matmul too;
    # matmul_params sees only an embedding lookup (it used to add the table itself for this
    # model), so it is added here as flops_per_token adds it.
    other += s2s.tgt_emb.weight.numel()
    same_len = s2s.flops_per_token(10, 10)
    attn = 12 * 16 * (t.n_enc_layers * 10 + t.n_dec_layers * 20)
    assert same_len == 6 * (enc + other) + attn

    seen = []
    result = train_lm(
        LM,
        V,
        lm_stream(50, 0),
        valid_ids=lm_stream(5, 1),
        cfg=lm_cfg(max_steps=4),
        out_dir=tmp_path,
        on_metrics=lambda m, s: seen.append(m),
    )
    assert all(m["mfu"] > 0 for m in seen if "train_loss" in m)
    assert result.mfu == pytest.approx(result.tokens_per_s * expected / PEAK)

    monkeypatch.delenv("SEQMODELS_PEAK_FLOPS")
    monkeypatch.setattr(flops, "_peak_cache", {})
    measured = []
    monkeypatch.setattr(flops, "_measure_peak", lambda d: measured.append(d) or 5e10)
    assert flops.peak_flops(torch.device("cpu")) == flops.peak_flops(torch.device("cpu")) == 5e10
    assert len(measured) == 1  # measured once per process


# --- data parallelism -------------------------------------------------------------------


def write_spec(tmp_path: Path, name: str, task: str) -> Path:
    train = dict(max_steps=5, batch_tokens=64, lr=5e-3, warmup_steps=2, log_every=1, eval_every=5)
    if task == "language_model":
        np.save(tmp_path / "lm-train.npy", lm_stream(150, 0))
        np.save(tmp_path / "lm-valid.npy", lm_stream(15, 1))
        data = {"train": "lm-train.npy", "valid": "lm-valid.npy"}
        model_type, arch = LM_NO_DROPOUT.type, LM_NO_DROPOUT.arch.model_dump()
        train["block_size"] = 16  # an LM setting: seq2seq training settings refuse it
    else:
        save_pairs(tmp_path / "mt-train.npz", copy_pairs(120, 0))
        save_pairs(tmp_path / "mt-valid.npz", copy_pairs(12, 1))
        data = {"train": "mt-train.npz", "valid": "mt-valid.npz"}
        model_type = "transformer_seq2seq"
        arch = TransformerSeq2SeqArchitecture(
            d_model=16, n_head=2, n_enc_layers=1, n_dec_layers=1, d_ff=32, dropout=0
        ).model_dump()
    spec = {
        "type": model_type,
        "architecture": arch,
        "training": train,
        "data": data,
        "vocab_size": V,
        "out_dir": name,
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def read_metrics(path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    train = [r for r in rows if "train_loss" in r]
    assert len({r["step"] for r in train}) == len(train)  # one writer: rank 0
    return {r["step"]: r for r in train}, [r for r in rows if "valid_loss" in r]


def test_two_process_ddp_matches_single_process(tmp_path):
    tasks = ["language_model", "translation"]
    for task in tasks:  # the reference: one process, in this one
        run_spec(json.loads(write_spec(tmp_path, f"single-{task}", task).read_text()), tmp_path)
    specs = [str(write_spec(tmp_path, f"ddp-{task}", task)) for task in tasks]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += ["-m", "seqmodels.torchrun", "--spec", *specs]  # both models in one launch
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 2 and all(math.isfinite(s["best_valid_loss"]) for s in summaries)

    for task in tasks:
        single, ddp = tmp_path / f"single-{task}", tmp_path / f"ddp-{task}"
        ref_train, ref_valid = read_metrics(single / "metrics.jsonl")
        got_train, got_valid = read_metrics(ddp / "metrics.jsonl")
        assert sorted(got_train) == sorted(ref_train) == [1, 2, 3, 4, 5]
        for step in ref_train:
            assert got_train[step]["train_loss"] == pytest.approx(
                ref_train[step]["train_loss"], rel=1e-4
            ), (task, step)
        assert got_valid[0]["valid_loss"] == pytest.approx(ref_valid[0]["valid_loss"], rel=1e-4)
        assert [s for s, _ in list_checkpoints(ddp / "checkpoints")] == [5]  # rank 0 only
        # Ranks split the global batch: together they trained on as many tokens as one process.
        progress = [
            load_checkpoint(run / "checkpoints" / "step-0000005.pt")["progress"]
            for run in (single, ddp)
        ]
        assert progress[0]["train_tokens"] == progress[1]["train_tokens"]
        ref_w = torch.load(single / "model.pt", weights_only=True)
        got_w = torch.load(ddp / "model.pt", weights_only=True)
        for k in ref_w:
            torch.testing.assert_close(got_w[k], ref_w[k], rtol=1e-3, atol=1e-4)


def test_spec_trains_from_cleaned_parquet_and_sentencepiece(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import sentencepiece as spm

    words = "the a cat dog sat ran on under mat log big small red blue house tree".split()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, int(rng.integers(3, 9)))) for _ in range(200)]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=40,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    table = {"id": list(range(200)), "split": ["train"] * 180 + ["valid"] * 20, "text": lines}
    pq.write_table(pa.table(table), tmp_path / "corpus.parquet")
    spec = {  # the vocabulary size comes from sp.model
        "type": "lstm_lm",
        "architecture": {"emb_dim": 16, "hidden_size": 16, "n_layers": 1},
        "training": {"max_steps": 3, "batch_tokens": 64, "block_size": 8, "eval_every": 3},
        "data": {"parquet": "corpus.parquet", "spm": "sp.model"},
        "out_dir": "model",
    }
    result = run_spec(spec, base=tmp_path)  # the family's summary
    assert result["steps"] == 3 and math.isfinite(result["best_valid_loss"])
    predictor = load_predictor(tmp_path / "model", device="cpu")  # a complete model folder
    assert isinstance(predictor, NeuralLMPredictor)
    assert isinstance(predictor.model, torch.nn.Module)
