"""Neural models, decoding, training and inference on tiny CPU-sized problems."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from seqmodels import BOS_ID, EOS_ID, PAD_ID
from seqmodels.inference import predictors
from seqmodels.inference.decoding import (
    beam_search,
    greedy_decode,
    sample_continuation,
    select_batch,
    sequence_log_probs,
)
from seqmodels.inference.predictors import NeuralLMPredictor, TranslationPredictor
from seqmodels.models import FAMILIES, layers
from seqmodels.models.lstm_seq2seq import LSTMSeq2SeqArchitecture
from seqmodels.models.recurrent_lm import RecurrentLMArchitecture
from seqmodels.models.transformer_lm import TransformerLMArchitecture
from seqmodels.models.transformer_seq2seq import TransformerSeq2SeqArchitecture
from seqmodels.training.batching import token_batches
from seqmodels.training.checkpoint import list_checkpoints, load_checkpoint
from seqmodels.training.settings import LMTrainSettings, Seq2SeqTrainSettings
from seqmodels.training.trainer import lr_at, save_weights
from tests.model_helpers import FamilyArch, build, load_trained, train_lm, train_s2s

V = 40  # tiny vocabulary for model-level tests

TINY_LMS = {
    "transformer": FamilyArch(
        "transformer_lm",
        TransformerLMArchitecture(
            block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64, dropout=0.0
        ),
    ),
    "lstm": FamilyArch("lstm_lm", RecurrentLMArchitecture(emb_dim=32, hidden_size=32, n_layers=2)),
    "gru": FamilyArch("gru_lm", RecurrentLMArchitecture(emb_dim=16, hidden_size=32, n_layers=1)),
}
TINY_S2S = {
    "transformer": FamilyArch(
        "transformer_seq2seq",
        TransformerSeq2SeqArchitecture(
            d_model=32, n_head=4, n_enc_layers=2, n_dec_layers=2, d_ff=64, dropout=0.0
        ),
    ),
    "transformer_learned_unshared": FamilyArch(
        "transformer_seq2seq",
        TransformerSeq2SeqArchitecture(
            d_model=32, n_head=4, d_ff=64, positions="learned", share_embeddings=False
        ),
    ),
    "lstm": FamilyArch(
        "lstm_seq2seq", LSTMSeq2SeqArchitecture(emb_dim=16, enc_hidden=16, dec_hidden=32)
    ),
    "lstm_feed_additive": FamilyArch(
        "lstm_seq2seq",
        LSTMSeq2SeqArchitecture(
            emb_dim=16,
            enc_hidden=16,
            dec_hidden=32,
            n_enc_layers=2,
            n_dec_layers=2,
            attention="additive",
            input_feeding=True,
        ),
    ),
    "lstm_dot": FamilyArch(
        "lstm_seq2seq",
        LSTMSeq2SeqArchitecture(emb_dim=16, enc_hidden=16, dec_hidden=32, attention="dot"),
    ),
}


@pytest.fixture(autouse=True)
def one_thread(single_thread_torch):
    """Every test here runs torch single-threaded (see conftest.single_thread_torch)."""


def tiny_model(spec: FamilyArch, seed: int = 0):
    return build(spec, V, seed).eval()


def padded_batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.full((len(seqs), max(map(len, seqs))), PAD_ID)
    for i, s in enumerate(seqs):
        src[i, : len(s)] = torch.tensor(s)
    return src, src != PAD_ID


SOURCES = [[5, 6, 7, 8, 9, EOS_ID], [10, 11, EOS_ID], [12, 13, 14, 15, EOS_ID]]


# --- language models --------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY_LMS)
def test_lm_shapes_and_causality(name):
    model = tiny_model(TINY_LMS[name])
    x = torch.randint(4, V, (2, 12))
    logits, _ = model(x)
    assert logits.shape == (2, 12, V)
    y = x.clone()
    y[:, 8] = (y[:, 8] + 1 - 4) % (V - 4) + 4  # change a "future" token
    logits2, _ = model(y)
    torch.testing.assert_close(logits[:, :8], logits2[:, :8])
    assert not torch.allclose(logits[:, 8:], logits2[:, 8:])


def test_transformer_lm_kv_cache_matches_full_forward():
    model = tiny_model(TINY_LMS["transformer"])
    x = torch.randint(4, V, (3, 14))
    full, _ = model(x)
    parts, cache = [], None
    for a, b in [(0, 5), (5, 6), (6, 11), (11, 14)]:  # multi-token and single-token steps
        logits, cache = model(x[:, a:b], cache)  # the Transformer LM's state is its cache
        assert model.state_length(cache) == b
        parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_rnn_lm_carried_state_matches_full_forward():
    model = tiny_model(TINY_LMS["lstm"])
    x = torch.randint(4, V, (2, 20))
    full, _ = model(x)
    a, state = model(x[:, :7])
    b, _ = model(x[:, 7:], state)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)


def test_sampling_past_block_size_and_seeded():
    model = tiny_model(TINY_LMS["transformer"])  # block_size 16
    gen = lambda seed: sample_continuation(  # noqa: E731
        model,
        [EOS_ID, 5, 6],
        max_new_tokens=40,
        top_k=10,
        top_p=0.9,
        generator=torch.Generator().manual_seed(seed),
        stop_token=None,
    )
    out = gen(1)
    assert len(out) == 40 and not {PAD_ID, BOS_ID} & set(out)
    assert out == gen(1)
    # temperature 0 is greedy: the first token is the argmax after the prompt
    greedy = sample_continuation(
        model, [EOS_ID, 5, 6], max_new_tokens=3, temperature=0, stop_token=None
    )
    logits, _ = model(torch.tensor([[EOS_ID, 5, 6]]))
    logits[0, -1, [PAD_ID, BOS_ID]] = float("-inf")
    assert greedy[0] == int(logits[0, -1].argmax())
    rnn_out = sample_continuation(
        tiny_model(TINY_LMS["gru"]), [EOS_ID], max_new_tokens=30, stop_token=None
    )
    assert len(rnn_out) == 30


# --- seq2seq models and decoding ---------------------------------------------------------


# Rows kept before a step, as beam search keeps them: none reordered; or rows 2, 0, 2 before
# step 1 and, before step 3, the last two of those, then swapped (repeats, drops, two in a row).
REORDERS = {"in_order": {}, "reordered": {1: [[2, 0, 2]], 3: [[1, 2], [1, 0]]}}


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])  # search, training
@pytest.mark.parametrize("reorders", REORDERS)
@pytest.mark.parametrize("name", TINY_S2S)
def test_seq2seq_incremental_decoding_matches_forward(name, reorders, grad):
    model = tiny_model(TINY_S2S[name])
    with torch.no_grad():  # weights large enough that every row's past moves its logits
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    src, mask = padded_batch(SOURCES)
    tgt_in = torch.tensor([[BOS_ID, 7, 8, 9, 20], [BOS_ID, 11, 12, 13, 14], [BOS_ID, 5, 5, 6, 7]])
    full = model(src, mask, tgt_in).detach()
    assert full.shape == (3, 5, V)
    with torch.set_grad_enabled(grad):
        memory = model.encode(src, mask)
        state = model.init_state(memory)
        rows = torch.arange(3)  # the original row behind each row of the state
        for t in range(tgt_in.size(1)):
            for keep in map(torch.tensor, REORDERS[reorders].get(t, [])):
                state, memory = model.reorder_state(state, keep), select_batch(memory, keep)
                rows = rows[keep]
            logits, state = model.decode_step(tgt_in[rows, t], state, memory)
            torch.testing.assert_close(logits, full[rows, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["transformer", "lstm"])
def test_seq2seq_source_padding_is_masked(name):
    model = tiny_model(TINY_S2S[name])
    tgt_in = torch.tensor([[BOS_ID, 7, 8]])
    src, mask = padded_batch([[10, 11, EOS_ID]])
    alone = model(src, mask, tgt_in)
    batch_src, batch_mask = padded_batch([[10, 11, EOS_ID], [5, 6, 7, 8, 9, 10, EOS_ID]])
    in_batch = model(batch_src, batch_mask, tgt_in.expand(2, -1))[:1]
    torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["transformer", "lstm", "lstm_feed_additive"])
def test_beam_size_one_equals_greedy(name):
    model = tiny_model(TINY_S2S[name])
    src, mask = padded_batch(SOURCES)
    greedy = greedy_decode(model, src, mask, max_len_a=1.0, max_len_b=5)
    beam = beam_search(model, src, mask, beam_size=1, max_len_a=1.0, max_len_b=5)
    assert beam == greedy
    # Length limit a * src_len + b (EOS not counted); no special tokens in the output.
    for out, s in zip(greedy, SOURCES, strict=True):
        assert len(out) <= 1.0 * len(s) + 5
        assert not {PAD_ID, BOS_ID, EOS_ID} & set(out)


@pytest.mark.parametrize("name", ["transformer", "lstm"])
def test_beam_search_scores_at_least_greedy(name):
    # Sharper-than-init distributions make the search non-trivial.
    model = tiny_model(TINY_S2S[name], seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    src, mask = padded_batch(SOURCES * 3)
    greedy, greedy_scores = greedy_decode(model, src, mask, return_scores=True)
    beam, beam_scores = beam_search(
        model, src, mask, beam_size=5, length_penalty=0.0, return_scores=True
    )
    # Reported scores are the model's teacher-forced log-probabilities (penalty 0).
    np.testing.assert_allclose(beam_scores, sequence_log_probs(model, src, mask, beam), atol=1e-3)
    np.testing.assert_allclose(
        greedy_scores, sequence_log_probs(model, src, mask, greedy), atol=1e-3
    )
    assert all(b >= g - 1e-4 for b, g in zip(beam_scores, greedy_scores, strict=True))
    assert any(b > g + 1e-3 for b, g in zip(beam_scores, greedy_scores, strict=True))
    # Sentences finish at different steps and leave the batch; results must not depend
    # on what else is in the batch.
    assert len({len(h) for h in beam}) > 1
    alone = [
        beam_search(model, src[i : i + 1], mask[i : i + 1], beam_size=5, length_penalty=0.0)[0]
        for i in range(len(beam))
    ]
    assert alone == beam


# --- training ---------------------------------------------------------------------------


@pytest.mark.skipif(layers.ONEDNN_LINEAR is None, reason="this torch has no oneDNN linear")
def test_cpu_inference_linears_run_on_onednn_with_the_same_results():
    torch.manual_seed(0)
    lin = layers.Linear(32, 48)
    ref = torch.nn.Linear(32, 48)
    ref.load_state_dict(lin.state_dict())  # the same parameters: old checkpoints load as-is
    assert lin.state_dict().keys() == ref.state_dict().keys()
    inputs = [torch.randn(5, 32), torch.randn(3, 4, 32), torch.randn(4, 3, 32).transpose(0, 1)]
    inputs.append(torch.randn(3, 64)[:, ::2])  # strided
    with torch.no_grad():
        for x in inputs:
            torch.testing.assert_close(lin(x), ref(x), rtol=1e-5, atol=1e-5)
            w = lin.weight
            torch.testing.assert_close(layers.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    calls = []
    onednn = layers.ONEDNN_LINEAR
    spy = lambda *args: calls.append(args) or onednn(*args)  # noqa: E731
    try:
        layers.ONEDNN_LINEAR = spy
        with torch.no_grad():
            lin(inputs[0])
        assert len(calls) == 1  # inference: oneDNN
        x = torch.randn(5, 32, requires_grad=True)
        lin(x).sum().backward()  # training: F.linear, with its gradients
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            assert lin(inputs[0]).dtype == torch.bfloat16  # autocast: F.linear in bf16
        assert len(calls) == 1
    finally:
        layers.ONEDNN_LINEAR = onednn
    torch.testing.assert_close(x.grad, ref.weight.sum(0).expand(5, 32))


def test_lr_schedules():
    cfg = LMTrainSettings(lr=1e-3, warmup_steps=10, max_steps=100, schedule="inverse_sqrt")
    assert lr_at(5, cfg) == pytest.approx(5e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(40, cfg) == pytest.approx(5e-4)
    cos = Seq2SeqTrainSettings(
        lr=1e-3, warmup_steps=10, max_steps=100, schedule="cosine", min_lr_ratio=0.1
    )
    assert lr_at(10, cos) == pytest.approx(1e-3)
    assert lr_at(100, cos) == pytest.approx(1e-4)


def test_token_batches_are_bucketed_and_cover_everything():
    rng = np.random.default_rng(0)
    src_lens = rng.integers(1, 30, 500)
    tgt_lens = rng.integers(1, 30, 500)
    batches = token_batches(src_lens, tgt_lens, 200, rng)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    for b in batches:
        longest = np.maximum(src_lens[b], tgt_lens[b]).max()
        assert len(b) * longest <= 200 or len(b) == 1


def repeating_stream(n_lines: int, seed: int = 0) -> np.ndarray:
    """EOS-separated lines following a fixed cyclic pattern: easy to learn."""
    rng = np.random.default_rng(seed)
    ids = [EOS_ID]
    for _ in range(n_lines):
        start = int(rng.integers(0, 8))
        ids += [4 + (start + i) % 8 for i in range(int(rng.integers(3, 9)))] + [EOS_ID]
    return np.array(ids, dtype=np.int32)


TRAINABLE_LMS = {
    "transformer": (TINY_LMS["transformer"], 5e-3),
    "lstm": (
        FamilyArch(
            "lstm_lm", RecurrentLMArchitecture(emb_dim=32, hidden_size=32, n_layers=1, dropout=0.0)
        ),
        2e-2,
    ),
}


@pytest.mark.parametrize("name", TRAINABLE_LMS)
def test_train_language_model_learns_and_checkpoint_reloads(name, tmp_path):
    seen = []
    spec, lr = TRAINABLE_LMS[name]
    cfg = LMTrainSettings(
        max_steps=120,
        batch_tokens=256,
        lr=lr,
        warmup_steps=10,
        eval_every=60,
        log_every=10,
        block_size=16,
    )
    result = train_lm(
        spec,
        V,
        repeating_stream(400),
        valid_ids=repeating_stream(50, seed=1),
        cfg=cfg,
        out_dir=tmp_path,
        on_metrics=lambda m, step: seen.append((dict(m), step)),
    )
    train_losses = [m["train_loss"] for m, _ in seen if "train_loss" in m]
    assert train_losses[-1] < 0.7 * train_losses[0]
    assert result.best_valid_loss < 0.5 * math.log(V)
    assert result.steps == 120 and result.n_parameters > 0 and result.padding_fraction == 0.0
    assert {"train_loss", "lr", "tokens_per_s"} <= set(seen[0][0])
    assert any(set(m) == {"valid_loss", "valid_ppl"} for m, _ in seen)

    # The trainer writes weights only (no model_config.json); what the model is, is recorded
    # with the checkpoints (the folder's metadata is written by seqmodels.models.folder).
    assert not (tmp_path / "model_config.json").exists()
    meta = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1][1])["model_identity"]
    assert meta["type"] == {"transformer": "transformer_lm", "lstm": "lstm_lm"}[name]
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    model = load_trained(spec, V, tmp_path)
    x = torch.from_numpy(repeating_stream(3).astype(np.int64))[None, :16]
    family = FAMILIES[meta["type"]]
    arch = family.Architecture.model_validate(meta["architecture"])
    reloaded = family.build(arch, meta["vocab_size"]).eval()
    reloaded.load_state_dict(state)
    torch.testing.assert_close(model(x)[0], reloaded(x)[0])


def test_training_without_validation_keeps_final_weights(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"stale weights from an older run")
    cfg = LMTrainSettings(max_steps=5, batch_tokens=64, block_size=8, log_every=5)
    no_valid = np.array([], dtype=np.int32)
    result = train_lm(
        TINY_LMS["gru"], V, repeating_stream(50), valid_ids=no_valid, cfg=cfg, out_dir=tmp_path
    )
    assert result.steps == 5 and math.isinf(result.best_valid_loss)
    assert isinstance(load_trained(TINY_LMS["gru"], V, tmp_path), torch.nn.Module)


def copy_pairs(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        s = rng.integers(4, 12, int(rng.integers(2, 6))).astype(np.int32)
        pairs.append((s, s.copy()))
    return pairs


def test_train_translation_model_learns_copy_task(tmp_path):
    seen = []
    cfg = Seq2SeqTrainSettings(
        max_steps=250,
        batch_tokens=512,
        lr=1e-2,
        warmup_steps=20,
        eval_every=125,
        log_every=50,
        label_smoothing=0.0,
    )
    spec = FamilyArch(
        "lstm_seq2seq",
        LSTMSeq2SeqArchitecture(emb_dim=64, enc_hidden=32, dec_hidden=64, dropout=0.0),
    )
    result = train_s2s(
        spec,
        16,
        copy_pairs(1000, 0),
        valid_pairs=copy_pairs(100, 1),
        cfg=cfg,
        out_dir=tmp_path,
        on_metrics=lambda m, step: seen.append(m),
    )
    assert result.best_valid_loss < 0.3
    assert 0.0 < result.padding_fraction < 0.5
    model = load_trained(spec, 16, tmp_path)
    tests = [[5, 9, 7, 4], [11, 6, 8]]
    src, mask = padded_batch([t + [EOS_ID] for t in tests])
    assert beam_search(model, src, mask, beam_size=3) == tests


def test_transformer_seq2seq_overfits_few_pairs(tmp_path):
    pairs = copy_pairs(8, 2)
    cfg = Seq2SeqTrainSettings(
        max_steps=200,
        batch_tokens=64,
        lr=1e-2,
        warmup_steps=10,
        eval_every=100,
        log_every=50,
        label_smoothing=0.0,
    )
    result = train_s2s(
        TINY_S2S["transformer"], V, pairs, valid_pairs=pairs, cfg=cfg, out_dir=tmp_path
    )
    assert result.best_valid_loss < 0.1


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = tiny_model(TINY_LMS["gru"])
    save_weights(model, tmp_path)
    before = (tmp_path / "model.pt").read_bytes()

    def broken_save(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_weights(model, tmp_path)
    assert (tmp_path / "model.pt").read_bytes() == before  # old file untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temp litter


# --- inference with a SentencePiece model -----------------------------------------------


WORDS = "the a cat dog sat ran on under mat log big small red blue house tree".split()


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("spm")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, int(rng.integers(3, 9)))) for _ in range(300)]
    (d / "text.txt").write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(d / "text.txt"),
        model_prefix=str(d / "sp"),
        vocab_size=V,
        model_type="unigram",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return d / "sp.model"


def save_random_model(spec: FamilyArch, out_dir: Path, seed: int = 0) -> torch.nn.Module:
    out_dir.mkdir(parents=True, exist_ok=True)
    model = tiny_model(spec, seed)
    save_weights(model, out_dir)
    return model


def load_lm(spec: FamilyArch, model_dir: Path, spm_path: Path) -> NeuralLMPredictor:
    """The saved weights rebuilt on the CPU, as a predictor with the test vocabulary."""
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    return NeuralLMPredictor(load_trained(spec, V, model_dir), sp)


@pytest.mark.parametrize("name", ["transformer", "lstm"])
def test_total_nll_equals_hand_computed_sum(name, spm_path, tmp_path, monkeypatch):
    monkeypatch.setattr(predictors, "RNN_WINDOW", 5)  # RNN: state carried over many chunks
    spec = {
        "transformer": FamilyArch(
            "transformer_lm",
            TransformerLMArchitecture(block_size=8, n_layer=2, n_head=2, d_model=16, d_ff=32),
        ),
        "lstm": TINY_LMS["lstm"],
    }[name]
    model = save_random_model(spec, tmp_path / "lm")
    lm = load_lm(spec, tmp_path / "lm", spm_path)
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    lines = ["the cat sat on the mat", "a big red dog ran under the tree", "", "blue house"] * 2
    ids = [EOS_ID]
    for line in lines:
        ids += sp.encode(line) + [EOS_ID]
    assert len(ids) > 4 * 8  # several scoring windows (block 8 / RNN chunks of 5)

    nll, n = lm.total_nll(lines)
    assert n == len(ids) - 1
    expected = 0.0
    with torch.no_grad():
        for j in range(len(ids) - 1):  # predict ids[j + 1] from its scoring context
            start = context_start(j, 8) if name == "transformer" else 0
            logits, _ = model(torch.tensor([ids[start : j + 1]]))
            expected -= float(F.log_softmax(logits[0, -1], -1)[ids[j + 1]])
    assert nll == pytest.approx(expected, rel=1e-4)


def context_start(j: int, block: int) -> int:
    """Windows start at multiples of block // 2; target j is scored by the first window
    [k * stride, k * stride + block) that contains it."""
    stride = block // 2
    k = 0 if j < block else (j - block) // stride + 1
    return k * stride


def test_generate_returns_seeded_continuations(spm_path, tmp_path):
    save_random_model(TINY_LMS["transformer"], tmp_path / "lm")
    lm = load_lm(TINY_LMS["transformer"], tmp_path / "lm", spm_path)
    outs = lm.generate(["the cat", ""], max_new_tokens=10, top_k=20, seed=7)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert outs == lm.generate(["the cat", ""], max_new_tokens=10, top_k=20, seed=7)


@pytest.mark.parametrize("name", ["transformer", "lstm"])
def test_translator_batching_keeps_order_and_results(name, spm_path, tmp_path):
    save_random_model(TINY_S2S[name], tmp_path / "mt", seed=1)
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    model = load_trained(TINY_S2S[name], V, tmp_path / "mt")
    tr = TranslationPredictor(model, sp, {"beam_size": 3, "batch_size": 2})
    sentences = ["the big dog", "a cat sat on the red mat under a tree", "log", "", "blue house"]
    out = tr.translate(sentences)
    assert len(out) == len(sentences) and all(isinstance(o, str) for o in out)
    assert out == [tr.translate([s])[0] for s in sentences]
