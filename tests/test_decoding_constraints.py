"""Decoding settings a summariser needs (seqmodels.inference.decoding, the predictors):
min_len, no_repeat_ngram_size and max_source_tokens, in greedy and beam search of every
sequence-to-sequence family, and in Hugging Face generate for the pretrained one."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqmodels import BOS_ID, EOS_ID, PAD_ID
from seqmodels.inference.decoding import (
    ban_repeated_ngrams,
    beam_search,
    forbid_eos,
    greedy_decode,
    sequence_log_probs,
)
from seqmodels.inference.predictors import DECODING_KEYS, TranslationPredictor
from seqmodels.models.conv_seq2seq import ConvSeq2SeqArchitecture
from seqmodels.models.lstm_seq2seq import LSTMSeq2SeqArchitecture
from seqmodels.models.transformer_seq2seq import TransformerSeq2SeqArchitecture
from tests.model_helpers import FamilyArch, build

V = 40  # tiny vocabulary for model-level tests
FAMILIES = {
    "transformer": FamilyArch(
        "transformer_seq2seq",
        TransformerSeq2SeqArchitecture(
            d_model=32, n_head=4, n_enc_layers=2, n_dec_layers=2, d_ff=64, dropout=0.0
        ),
    ),
    "lstm": FamilyArch(
        "lstm_seq2seq", LSTMSeq2SeqArchitecture(emb_dim=16, enc_hidden=16, dec_hidden=32)
    ),
    "conv": FamilyArch(
        "conv_seq2seq",
        ConvSeq2SeqArchitecture(
            emb_dim=16, hidden=24, n_enc_layers=2, n_dec_layers=2, kernel_size=3, dropout=0.0
        ),
    ),
}
SEARCHES = {
    "greedy": lambda model, src, mask, **kw: greedy_decode(model, src, mask, **kw),
    "beam": lambda model, src, mask, **kw: beam_search(model, src, mask, beam_size=3, **kw),
}


@pytest.fixture(autouse=True)
def one_thread(single_thread_torch):
    """Every test here runs torch single-threaded (see conftest.single_thread_torch)."""


class EosBias(nn.Module):
    """A seq2seq model with `bias` added to its EOS logit: negative keeps outputs running to
    their max length (so a random model repeats itself), positive ends them at once (so
    min_len has something to forbid). Records the sources it encodes."""

    def __init__(self, inner: nn.Module, bias: float = 0.0):
        super().__init__()
        self.inner, self.bias = inner, bias
        self.sources: list[list[int]] = []

    @property
    def max_positions(self) -> int | None:
        return self.inner.max_positions

    def forward(self, src, src_mask, tgt_in):
        logits = self.inner(src, src_mask, tgt_in).clone()
        logits[..., EOS_ID] += self.bias
        return logits

    def encode(self, src, src_mask):
        self.sources += [row[m].tolist() for row, m in zip(src, src_mask, strict=True)]
        return self.inner.encode(src, src_mask)

    def init_state(self, memory):
        return self.inner.init_state(memory)

    def decode_step(self, tokens, state, memory):
        logits, state = self.inner.decode_step(tokens, state, memory)
        logits = logits.clone()
        logits[:, EOS_ID] += self.bias
        return logits, state

    def reorder_state(self, state, index):
        return self.inner.reorder_state(state, index)


def tiny(name: str, eos_bias: float = 0.0, seed: int = 0) -> EosBias:
    return EosBias(build(FAMILIES[name], V, seed).eval(), eos_bias)


def batch(seed: int = 0, lengths=(4, 7, 3, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sources ending in EOS, padded into one (B, S) batch with its mask."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths) + 1), PAD_ID)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(EOS_ID + 1, V, (n,), generator=gen)
        src[i, n] = EOS_ID
    return src, src != PAD_ID


def repeated_ngram(ids: list[int], n: int) -> bool:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


# --- ban_repeated_ngrams -----------------------------------------------------------------


def banned_by_brute_force(history: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already in `history` (the rule, spelt out)."""
    grams = {tuple(history[i : i + n]) for i in range(len(history) - n + 1)}
    last = tuple(history[len(history) - n + 1 :]) if n > 1 else ()
    return {gram[-1] for gram in grams if gram[:-1] == last}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [0, 1, 3, 6, 15])
def test_ban_repeated_ngrams_matches_brute_force(n, length):
    rng = random.Random(n * 100 + length)
    B, K, vocab = 4, 3, 6  # a small vocabulary: histories repeat themselves a lot
    histories = [[rng.randrange(vocab) for _ in range(length)] for _ in range(B * K)]
    tokens = torch.tensor(histories, dtype=torch.long).view(B * K, length)
    log_probs = torch.randn(B * K, vocab).log_softmax(-1)
    banned = ban_repeated_ngrams(log_probs.clone(), tokens, n)
    for row, history in enumerate(histories):
        expected = banned_by_brute_force(history, n)
        assert set(torch.isinf(banned[row]).nonzero()[:, 0].tolist()) == expected
        keep = torch.isfinite(banned[row])
        assert torch.equal(banned[row][keep], log_probs[row][keep])  # the rest untouched
    if length >= 6 and n <= 3:  # the rule did ban something here
        assert torch.isinf(banned).any()


def test_ban_repeated_ngrams_off_or_too_short_changes_nothing():
    tokens = torch.tensor([[5, 6, 5, 6, 5]])
    log_probs = torch.randn(1, 10)
    assert torch.equal(ban_repeated_ngrams(log_probs.clone(), tokens, 0), log_probs)
    assert torch.equal(ban_repeated_ngrams(log_probs.clone(), tokens, 6), log_probs)
    # "5 6" and "6 5" were seen: after "... 5" the bigram rule bans 6.
    assert torch.isinf(ban_repeated_ngrams(log_probs.clone(), tokens, 2)).nonzero().tolist() == [
        [0, 6]
    ]


def test_forbid_eos_until_min_len_unless_at_max_length():
    log_probs = torch.zeros(3, 8)
    at_max = torch.tensor([False, True, False])
    out = forbid_eos(log_probs.clone(), step=2, min_len=3, at_max=at_max)
    assert out[:, EOS_ID].tolist() == [float("-inf"), 0.0, float("-inf")]  # the max wins
    assert torch.equal(forbid_eos(log_probs.clone(), step=3, min_len=3, at_max=at_max), log_probs)


# --- greedy and beam search of every family ----------------------------------------------


def reference_greedy(
    model: nn.Module, src: torch.Tensor, mask: torch.Tensor, max_len: int, *, min_len=0, n=0
) -> list[int]:
    """Greedy decoding of one sentence the slow way: a full forward pass per step and the
    constraints applied by brute force."""
    out: list[int] = []
    for step in range(max_len + 1):
        tgt_in = torch.tensor([[BOS_ID] + out])
        logp = F.log_softmax(model(src, mask, tgt_in)[0, -1].float(), -1)
        logp[[PAD_ID, BOS_ID]] = float("-inf")
        for token in banned_by_brute_force(out, n) if n else ():
            logp[token] = float("-inf")
        if step < min_len and step < max_len:
            logp[EOS_ID] = float("-inf")
        if step == max_len:
            return out
        nxt = int(logp.argmax())
        if nxt == EOS_ID:
            return out
        out.append(nxt)
    return out


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(("min_len", "n"), [(0, 0), (0, 2), (5, 0), (4, 3)])
def test_greedy_equals_a_brute_force_reference(name, min_len, n):
    model = tiny(name, eos_bias=2.0, seed=1)  # some outputs end early, some run long
    src, mask = batch(1)
    out = greedy_decode(
        model, src, mask, max_len_a=0.0, max_len_b=9, min_len=min_len, no_repeat_ngram_size=n
    )
    for i, hyp in enumerate(out):
        row = src[i : i + 1, : int(mask[i].sum())]
        assert hyp == reference_greedy(model, row, row != PAD_ID, 9, min_len=min_len, n=n)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_output_repeats_an_ngram(name, search, n):
    model = tiny(name, eos_bias=-5.0)  # outputs run to their max length: 20 tokens
    src, mask = batch(2)
    decode = SEARCHES[search]
    free = decode(model, src, mask, max_len_a=0.0, max_len_b=20)
    constrained = decode(model, src, mask, max_len_a=0.0, max_len_b=20, no_repeat_ngram_size=n)
    if n <= 2:  # a random model repeats itself: the setting has work to do
        assert any(repeated_ngram(hyp, n) for hyp in free)
    assert not any(repeated_ngram(hyp, n) for hyp in constrained)
    assert all(len(hyp) > 0 for hyp in constrained)


@pytest.mark.parametrize("name", FAMILIES)
def test_beam_scores_stay_the_models_log_probabilities_under_constraints(name):
    # Banned tokens are never chosen, so the chosen ones keep the model's own log-probs.
    model = tiny(name, eos_bias=1.0, seed=3)
    src, mask = batch(3)
    hyps, scores = beam_search(
        model,
        src,
        mask,
        beam_size=4,
        length_penalty=0.0,
        max_len_a=0.0,
        max_len_b=12,
        min_len=3,
        no_repeat_ngram_size=2,
        return_scores=True,
    )
    np.testing.assert_allclose(scores, sequence_log_probs(model, src, mask, hyps), atol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("search", SEARCHES)
def test_min_len_holds_unless_the_max_length_is_shorter(name, search):
    model = tiny(name, eos_bias=8.0)  # left alone, every output ends at once
    lengths = (2, 7, 3, 6, 9)
    src, mask = batch(4, lengths)
    decode = SEARCHES[search]
    # Max length = source tokens (EOS included) + 0: 3, 8, 4, 7 and 10; min_len 6.
    caps = [n + 1 for n in lengths]
    free = decode(model, src, mask, max_len_a=1.0, max_len_b=0)
    assert all(len(hyp) < 6 for hyp in free)
    out = decode(model, src, mask, max_len_a=1.0, max_len_b=0, min_len=6)
    for hyp, cap in zip(out, caps, strict=True):
        assert min(6, cap) <= len(hyp) <= cap
    assert [len(hyp) for hyp, cap in zip(out, caps, strict=True) if cap < 6] == [3, 4]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("search", SEARCHES)
def test_settings_off_decode_as_before(name, search):
    model = tiny(name, eos_bias=1.0, seed=5)
    src, mask = batch(5)
    decode = SEARCHES[search]
    default = decode(model, src, mask)
    assert decode(model, src, mask, min_len=0, no_repeat_ngram_size=0) == default
    # Constraints that can never bind take the constrained path and change nothing:
    # n-grams longer than any output, min_len 0.
    longest = int(1.2 * mask.sum(1).max() + 10) + 1
    assert decode(model, src, mask, no_repeat_ngram_size=longest + 1) == default


@pytest.mark.parametrize("name", FAMILIES)
def test_beam_size_one_equals_greedy_with_constraints(name):
    model = tiny(name, eos_bias=3.0, seed=6)
    src, mask = batch(6)
    settings = {"max_len_a": 0.0, "max_len_b": 10, "min_len": 4, "no_repeat_ngram_size": 2}
    greedy = greedy_decode(model, src, mask, **settings)
    assert beam_search(model, src, mask, beam_size=1, **settings) == greedy


# --- the predictor: settings, source cut, summarize --------------------------------------

WORDS = (
    "the a cat dog sat on mat red big ran under tree house blue email meeting please send "
    "report friday monday call notes budget team project thanks"
).split()


@pytest.fixture(scope="module")
def sp(tmp_path_factory) -> spm.SentencePieceProcessor:
    folder = tmp_path_factory.mktemp("spm")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, int(rng.integers(3, 9)))) for _ in range(300)]
    (folder / "text.txt").write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(folder / "text.txt"),
        model_prefix=str(folder / "sp"),
        vocab_size=V,
        model_type="unigram",
        pad_id=PAD_ID,
        unk_id=1,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        hard_vocab_limit=False,  # at most V pieces: the models' vocabulary
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))


def test_the_new_settings_are_decoding_keys():
    assert {"min_len", "no_repeat_ngram_size", "max_source_tokens"} <= set(DECODING_KEYS)


@pytest.mark.parametrize("name", FAMILIES)
def test_max_source_tokens_cuts_and_counts(name, sp):
    model = tiny(name)
    decoding = {"beam_size": 2, "max_len_a": 0.0, "max_len_b": 6, "max_source_tokens": 4}
    predictor = TranslationPredictor(model, sp, decoding)
    sources = [[5] * 10, [6, 7], [8, 9, 10, 11], [12] * 5]
    out = predictor.translate_ids(sources)
    assert predictor.truncated_sources == 2
    assert sorted(model.sources) == sorted([s[:4] + [EOS_ID] for s in sources])
    # The same outputs as the sources cut beforehand, without the setting.
    uncut = TranslationPredictor(tiny(name), sp, {**decoding, "max_source_tokens": None})
    assert uncut.translate_ids([s[:4] for s in sources]) == out
    assert uncut.truncated_sources == 0
    predictor.translate_ids([[5, 6]])  # the count is of the last call
    assert predictor.truncated_sources == 0


def test_sources_past_the_models_positions_are_counted_too(sp):
    arch = FAMILIES["conv"].arch.model_copy(update={"max_positions": 6})
    model = EosBias(build(FamilyArch("conv_seq2seq", arch), V, 0).eval())
    predictor = TranslationPredictor(model, sp, {"beam_size": 1, "max_len_b": 3})
    predictor.translate_ids([[5] * 9, [6] * 6, [7] * 2])
    assert predictor.truncated_sources == 2  # 5 pieces + EOS fill the 6 positions
    assert sorted(len(s) for s in model.sources) == [3, 6, 6]


@pytest.mark.parametrize("beam_size", [1, 3])
def test_summarize_decodes_with_the_settings(sp, beam_size):
    model = tiny("transformer", eos_bias=-3.0)
    decoding = {
        "beam_size": beam_size,
        "max_len_a": 0.0,
        "max_len_b": 12,  # a summary's fixed cap
        "min_len": 5,
        "no_repeat_ngram_size": 2,
        "max_source_tokens": 8,
        "length_penalty": 1.0,
    }
    predictor = TranslationPredictor(model, sp, decoding)
    assert (predictor.min_len, predictor.no_repeat_ngram_size) == (5, 2)
    texts = ["the big red dog ran under the blue tree to the house " * 3, "a cat"]
    summaries = predictor.summarize(texts)
    assert predictor.truncated_sources == 1
    assert summaries == predictor.translate(texts)
    ids = predictor.translate_ids(sp.encode(texts))
    assert [sp.decode(h) for h in ids] == summaries
    assert all(5 <= len(h) <= 12 and not repeated_ngram(h, 2) for h in ids)


# --- Hugging Face seq2seq: the settings become generate's arguments ---------------------


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    from tests.hf_checkpoints import make_tiny_marian, make_tiny_t5

    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, int(rng.integers(3, 9)))) for _ in range(200)]
    return {
        "marian": make_tiny_marian(tmp_path_factory.mktemp("marian"), lines),
        "t5": make_tiny_t5(tmp_path_factory.mktemp("t5"), lines),
    }


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def hf_predictor(folder: Path, decoding: dict):
    """The hf_seq2seq predictor of a save_pretrained folder, with generate spied on: each
    call's arguments and output ids are kept in predictor.calls."""
    from seqmodels.models import get_family
    from seqmodels.models.hf_seq2seq import HFSeq2SeqArchitecture

    family = get_family("hf_seq2seq")
    arch = HFSeq2SeqArchitecture(pretrained=str(folder))
    predictor = family.load_exported(folder, arch, decoding, device="cpu")
    hf, calls = predictor.model.hf, []
    generate = hf.generate

    def spy(**kwargs):
        out = generate(**kwargs)
        calls.append((kwargs, out))
        return out

    hf.generate = spy
    predictor.calls = calls
    return predictor


def new_tokens(predictor, row: torch.Tensor) -> list[int]:
    """Generated ids after the decoder start, up to (not including) EOS; the padding of a
    batch comes after EOS (a random T5 generates its pad id as a token too)."""
    eos, out = predictor.sp.tokenizer.eos_token_id, []
    for token in row.tolist()[len(predictor.framing.tgt_prefix) :]:
        if token == eos:
            break
        out.append(token)
    return out


SOURCES = ["the big red dog ran under the tree", "a cat sat on the mat", "email meeting"]


@pytest.mark.parametrize("checkpoint", ["marian", "t5"])
def test_hf_settings_reach_generate(hf_folders, offline, checkpoint):
    decoding = {"beam_size": 3, "max_len_a": 0.0, "max_len_b": 15, "length_penalty": 0.6}
    plain = hf_predictor(hf_folders[checkpoint], decoding)
    plain.summarize(SOURCES)
    ((kwargs, _),) = plain.calls
    assert (kwargs["num_beams"], kwargs["length_penalty"], kwargs["max_new_tokens"]) == (3, 0.6, 15)
    # Off: passed as 0, so a checkpoint's own generation config cannot turn them on.
    assert (kwargs["no_repeat_ngram_size"], kwargs["min_length"]) == (0, 0)
    assert kwargs.get("min_new_tokens") is None

    constrained = hf_predictor(
        hf_folders[checkpoint], {**decoding, "min_len": 6, "no_repeat_ngram_size": 2}
    )
    constrained.summarize(SOURCES)
    ((kwargs, generated),) = constrained.calls
    assert (kwargs["min_new_tokens"], kwargs["no_repeat_ngram_size"]) == (6, 2)
    for row in generated:
        ids = new_tokens(constrained, row)
        assert len(ids) >= 6 and not repeated_ngram(ids, 2)


def test_hf_no_repeat_ngram_size_binds(hf_folders, offline):
    decoding = {"beam_size": 2, "max_len_a": 0.0, "max_len_b": 20}
    free, constrained = (
        hf_predictor(hf_folders["marian"], {**decoding, "no_repeat_ngram_size": n}) for n in (0, 2)
    )
    for predictor in (free, constrained):  # EOS held back: outputs of 20 tokens
        predictor.model.hf.final_logits_bias[0, predictor.sp.tokenizer.eos_token_id] -= 20.0
        predictor.translate(SOURCES)
    free_ids = [new_tokens(free, row) for row in free.calls[0][1]]
    constrained_ids = [new_tokens(constrained, row) for row in constrained.calls[0][1]]
    assert any(repeated_ngram(ids, 2) for ids in free_ids)
    assert not any(repeated_ngram(ids, 2) for ids in constrained_ids)


def test_hf_min_len_binds_and_the_max_wins(hf_folders, offline):
    decoding = {"beam_size": 2, "max_len_a": 0.0, "max_len_b": 12}
    outputs = {}
    for min_len in (0, 5, 30):
        predictor = hf_predictor(hf_folders["marian"], {**decoding, "min_len": min_len})
        predictor.model.hf.final_logits_bias[0, predictor.sp.tokenizer.eos_token_id] += 20.0
        predictor.translate(SOURCES)
        ((kwargs, generated),) = predictor.calls
        outputs[min_len] = [len(new_tokens(predictor, row)) for row in generated]
        if min_len:
            assert kwargs["min_new_tokens"] == min(min_len, 12)
    assert outputs[0] == [0, 0, 0]  # EOS at once when nothing forbids it
    assert all(n >= 5 for n in outputs[5])
    # min_len past the max: the max wins (Marian's forced_eos_token_id makes the 12th new
    # token EOS, so 11 are text).
    assert outputs[30] == [11, 11, 11]


def test_hf_max_source_tokens_cuts_keeping_the_special_tokens(hf_folders, offline):
    predictor = hf_predictor(hf_folders["t5"], {"beam_size": 2, "max_source_tokens": 4})
    encoded = predictor.sp.encode(SOURCES)
    predictor.translate(SOURCES)
    assert predictor.truncated_sources == sum(len(ids) > 4 for ids in encoded)
    ((kwargs, _),) = predictor.calls
    rows = [
        row[mask.bool()].tolist()
        for row, mask in zip(kwargs["input_ids"], kwargs["attention_mask"], strict=True)
    ]
    expected = [ids[:4] + list(predictor.framing.src_suffix) for ids in encoded]  # </s> kept
    assert sorted(rows) == sorted(expected)
    predictor.translate(["a"])
    assert len(predictor.sp.encode("a")) <= 4 and predictor.truncated_sources == 0


def test_hf_exported_pipeline_decodes_with_the_settings(hf_folders, offline, tmp_path):
    from seqmodels.models import get_family
    from seqmodels.models.hf_seq2seq import HFSeq2SeqArchitecture

    family = get_family("hf_seq2seq")
    arch = HFSeq2SeqArchitecture(pretrained=str(hf_folders["marian"]))
    family.unpack_exported(hf_folders["marian"], arch, tmp_path / "model")
    decoding = {"beam_size": 2, "min_len": 3, "no_repeat_ngram_size": 3, "max_len_b": 8}
    pipe = family.transformers_pipeline(tmp_path / "model", arch, decoding, "translation")
    config = pipe.model.generation_config
    assert (config.min_new_tokens, config.no_repeat_ngram_size, config.num_beams) == (3, 3, 2)


def test_hf_the_experiments_settings_override_the_checkpoints(hf_folders, offline):
    # A summarisation checkpoint ships decoding defaults of its own (BART-CNN: min_length 56,
    # no_repeat_ngram_size 3); the experiment's settings decide, "off" included.
    predictor = hf_predictor(hf_folders["marian"], {"beam_size": 2, "max_len_b": 12})
    predictor.model.hf.generation_config.min_length = 8
    predictor.model.hf.generation_config.no_repeat_ngram_size = 1
    predictor.model.hf.final_logits_bias[0, predictor.sp.tokenizer.eos_token_id] += 20.0
    predictor.translate(SOURCES)
    ((_, generated),) = predictor.calls
    assert [len(new_tokens(predictor, row)) for row in generated] == [0, 0, 0]
