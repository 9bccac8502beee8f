"""seqmodels.models.ngram: modified Kneser-Ney estimation, scoring, sampling, file formats."""

from collections import Counter, defaultdict
from fractions import Fraction as F

import numpy as np
import pyarrow as pa
import pytest

from seqmodels import BOS_ID, EOS_ID, UNK_ID
from seqmodels.models.ngram import FALLBACK_DISCOUNTS, KneserNeyLM

V = 50  # ids 0..3 are pad/unk/bos/eos, 4..49 are "words"


def structured_corpus(n: int, seed: int) -> list[np.ndarray]:
    """Sentences from a sparse Markov chain: the previous id allows 4 successors and the one
    before it picks among them, so a bigram model helps and a trigram model helps more."""
    rng = np.random.default_rng(seed)
    successors = np.random.default_rng(0).integers(4, V, size=(V, 4))
    out = []
    for _ in range(n):
        s = [int(rng.integers(4, V)), int(rng.integers(4, V))]
        for _ in range(int(rng.integers(1, 12))):
            nxt = successors[s[-1], s[-2] % 4]
            s.append(int(rng.integers(4, V)) if rng.random() < 0.05 else int(nxt))
        out.append(np.array(s))
    return out


def random_corpus(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, V, size=rng.integers(0, 9)) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus() -> list[np.ndarray]:
    return structured_corpus(600, 1) + random_corpus(200, 2)


@pytest.fixture(scope="module")
def models(corpus) -> dict[int, KneserNeyLM]:
    return {
        n: KneserNeyLM.fit(corpus, n, V, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID)
        for n in (1, 2, 3, 5)
    }


def contexts(corpus: list[np.ndarray]) -> list[list[int]]:
    seen = [int(t) for t in corpus[0][:4]]
    return [
        [],  # mid-sentence, nothing known
        [BOS_ID],  # sentence start
        [BOS_ID, *seen[:2]],  # seen
        [BOS_ID, *seen],  # seen, longer than some orders use
        seen[1:3],  # seen mid-sentence
        [49, 48, 47, 46],  # most likely unseen as a whole
        [BOS_ID, 49, 49, 49],  # partially seen
        [seen[0], BOS_ID, seen[0]],  # everything before the last <s> is ignored
        [0, UNK_ID, 10**6],  # pad, <unk> and an out-of-range id
    ]


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize("order", [3, 5])
def test_next_token_distribution_sums_to_one(models, corpus, order):
    lm = models[order]
    for ctx in contexts(corpus):
        p = lm.next_token_probs(ctx)
        assert abs(p.sum() - 1.0) < 1e-9, ctx
        assert p[BOS_ID] == 0.0 and (np.delete(p, BOS_ID) > 0).all()
        # the whole-distribution path and the one-token path agree
        np.testing.assert_allclose(p, [lm.prob(ctx, w) for w in range(V)], rtol=1e-12, atol=0)


# ---------------------------------------------------------------- hand-computed example


def test_bigram_matches_hand_computation():
    a, b, c = 4, 5, 6
    sents = [[a, b, c], [a, b, c], [a, c, c], [a], [a, b], [], [a, b, b]]
    lm = KneserNeyLM.fit(
        [np.array(s) for s in sents], 2, 7, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID
    )

    # Bigram counts (highest order: raw counts), with <s> and </s>:
    #   <s> a: 6   <s> </s>: 1   a b: 4   a c: 1   a </s>: 1
    #   b c: 2     b </s>: 2     b b: 1   c </s>: 3  c c: 1
    # count-of-counts: n1 = 5, n2 = 2, n3 = 1, n4 = 1
    y = F(5, 5 + 2 * 2)
    d1, d2, d3 = 1 - 2 * y * F(2, 5), 2 - 3 * y * F(1, 2), 3 - 4 * y * F(1, 1)
    assert (d1, d2, d3) == (F(5, 9), F(7, 6), F(7, 9))
    # Unigram continuation counts (distinct left neighbours):
    #   a: {<s>} = 1   b: {a, b} = 2   c: {a, b, c} = 3   </s>: {<s>, a, b, c} = 4
    # count-of-counts n1 = n2 = n3 = n4 = 1
    y1 = F(1, 3)
    e1, e2, e3 = 1 - 2 * y1, 2 - 3 * y1, 3 - 4 * y1
    assert (e1, e2, e3) == (F(1, 3), F(1), F(5, 3))
    expected_discounts = np.array([[e1, e2, e3], [d1, d2, d3]], dtype=float)
    np.testing.assert_allclose(lm.discounts, expected_discounts, rtol=1e-12)

    # Unigrams: total continuation count 10, interpolated with uniform over the 6 ids != <s>.
    gamma0 = (e1 + e2 + e3 + e3) / 10  # a has 1, b 2, c 3, </s> 4 (3+ discount)
    uniform = F(1, 6)
    p1 = {
        a: (1 - e1) / 10 + gamma0 * uniform,
        b: (2 - e2) / 10 + gamma0 * uniform,
        c: (3 - e3) / 10 + gamma0 * uniform,
        EOS_ID: (4 - e3) / 10 + gamma0 * uniform,
        UNK_ID: gamma0 * uniform,
    }
    assert p1[a] == F(13, 90) and p1[EOS_ID] == F(28, 90)

    # Context a: a b = 4, a c = 1, a </s> = 1 -> total 6, left-over mass D3 + D1 + D1.
    gamma_a = (d3 + d1 + d1) / 6
    # Context <s>: <s> a = 6, <s> </s> = 1 -> total 7.
    gamma_s = (d3 + d1) / 7
    # Context b: b c = 2, b </s> = 2, b b = 1 -> total 5.
    gamma_b = (d2 + d2 + d1) / 5
    expected = {
        ((a,), b): (4 - d3) / 6 + gamma_a * p1[b],
        ((a,), c): (1 - d1) / 6 + gamma_a * p1[c],
        ((a,), a): gamma_a * p1[a],  # unseen bigram: backoff only
        ((BOS_ID,), a): (6 - d3) / 7 + gamma_s * p1[a],
        ((BOS_ID,), b): gamma_s * p1[b],
        ((b,), EOS_ID): (2 - d2) / 5 + gamma_b * p1[EOS_ID],
        ((b,), UNK_ID): gamma_b * p1[UNK_ID],
        ((UNK_ID,), c): p1[c],  # context never seen: plain unigram
        ((), a): p1[a],
    }
    for (ctx, w), p in expected.items():
        assert lm.prob(ctx, w) == pytest.approx(float(p), abs=1e-14), (ctx, w)
    assert lm.prob([a], BOS_ID) == 0.0
    assert lm.prob([a], 10**6) == lm.prob([a], UNK_ID)  # out-of-range id -> <unk>


def test_discount_fallback_on_tiny_corpus():
    lm = KneserNeyLM.fit([np.array([4, 5])], 3, 7, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID)
    np.testing.assert_array_equal(lm.discounts, [FALLBACK_DISCOUNTS] * 3)
    assert lm.next_token_probs([BOS_ID, 4]).sum() == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------- brute-force reference


def reference_kn(sents, n, vocab):
    """Dict-of-counts modified KN with the same conventions, written for clarity not speed."""
    seqs = [[BOS_ID, *map(int, s), EOS_ID] for s in sents]
    raw = [Counter() for _ in range(n + 1)]
    for s in seqs:
        for i in range(1, len(s)):
            for k in range(1, min(n, i + 1) + 1):
                raw[k][tuple(s[i - k + 1 : i + 1])] += 1
    adj = [Counter() for _ in range(n + 1)]
    adj[n] = raw[n]
    for k in range(n - 1, 0, -1):
        adj[k] = Counter({g: c for g, c in raw[k].items() if g[0] == BOS_ID})
        adj[k].update(g[1:] for g in raw[k + 1])  # one per distinct left extension
    disc, total, left = [None], [None], [None]
    for k in range(1, n + 1):
        nk = [sum(v == j for v in adj[k].values()) for j in (1, 2, 3, 4)]
        try:
            y = nk[0] / (nk[0] + 2 * nk[1])
            d = [1 - 2 * y * nk[1] / nk[0], 2 - 3 * y * nk[2] / nk[1], 3 - 4 * y * nk[3] / nk[2]]
            assert all(0 < dj <= j for j, dj in enumerate(d, 1))
        except (ZeroDivisionError, AssertionError):
            d = list(FALLBACK_DISCOUNTS)
        disc.append(d)
        total.append(defaultdict(float))
        left.append(defaultdict(float))
        for g, a in adj[k].items():
            total[k][g[:-1]] += a
            left[k][g[:-1]] += d[min(a, 3) - 1]

    def p(h, w, k):
        if k == 0:
            return 1.0 / (vocab - 1)
        lower = p(h[1:], w, k - 1)
        if total[k].get(h, 0) == 0:
            return lower
        a = adj[k].get((*h, w), 0)
        d = disc[k][min(a, 3) - 1] if a else 0.0
        return (a - d) / total[k][h] + left[k][h] / total[k][h] * lower

    def prob(history, w):  # history starts with <s>
        h = tuple(history[max(0, len(history) - n + 1) :])
        return p(h, w, len(h) + 1)

    return prob


@pytest.mark.parametrize("order", [3, 5])
def test_vectorised_scores_match_reference_and_prob(models, corpus, order):
    lm = models[order]
    ref = reference_kn(corpus, order, V)
    held_out = structured_corpus(40, 7) + [np.array([]), np.array([0, UNK_ID, 10**6, 5, 5])]
    logp = lm.sentence_logprobs(held_out)
    assert len(logp) == sum(len(s) + 1 for s in held_out)
    by_prob, by_ref = [], []
    for s in held_out:
        history = [BOS_ID]
        for w in [*(int(t) if 0 <= t < V else UNK_ID for t in s), EOS_ID]:
            by_prob.append(np.log(lm.prob(history, w)))
            by_ref.append(np.log(ref(history, w)))
            history.append(w)
    np.testing.assert_allclose(logp, by_prob, rtol=0, atol=1e-12)
    np.testing.assert_allclose(logp, by_ref, rtol=0, atol=1e-12)
    nll, n = lm.total_nll(held_out)
    assert n == len(logp) and nll == pytest.approx(-logp.sum())


def test_arrow_input_matches_list_input(models, corpus):
    column = pa.array([s.tolist() for s in corpus], pa.list_(pa.int32()))
    chunked = pa.chunked_array([column[:300], column[300:]])
    lm = KneserNeyLM.fit(chunked, 3, V, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID)
    np.testing.assert_array_equal(lm.sentence_logprobs(column), models[3].sentence_logprobs(corpus))


def test_perplexity_falls_with_order(models):
    held_out = structured_corpus(300, 99)
    ppl = [models[n].perplexity(held_out) for n in (1, 2, 3)]
    assert ppl[0] > 1.3 * ppl[1] > 1.3 * 1.3 * ppl[2], ppl


# ---------------------------------------------------------------- sampling


def test_sampling_is_reproducible_and_stops_at_eos(models):
    lm = models[3]
    runs = [lm.sample(20, [10, 20], max_tokens=30, rng=np.random.default_rng(5)) for _ in "ab"]
    assert all(np.array_equal(x, y) for x, y in zip(*runs, strict=True))
    other = lm.sample(20, prompt=[10, 20], max_tokens=30, rng=np.random.default_rng(6))
    assert not all(np.array_equal(x, y) for x, y in zip(runs[0], other, strict=True))
    for s in runs[0]:
        assert len(s) <= 30 and EOS_ID not in s and BOS_ID not in s
    assert sum(len(s) < 30 for s in runs[0]) >= 15  # nearly all stopped at </s>

    abc = KneserNeyLM.fit(
        [np.array([4, 5, 6])] * 200, 3, 7, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID
    )
    samples = abc.sample(20, prompt=[4], max_tokens=10, rng=0)
    assert sum(s.tolist() == [5, 6] for s in samples) >= 17


# ---------------------------------------------------------------- files


def test_save_load_round_trip(models, corpus, tmp_path):
    for order, lm in models.items():
        path = tmp_path / f"lm{order}.npz"
        lm.save(path)
        loaded = KneserNeyLM.load(path)
        assert (loaded.order, loaded.vocab_size) == (order, V)
        assert (loaded.sentence_logprobs(corpus) == lm.sentence_logprobs(corpus)).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"lm{n}.npz" for n in (1, 2, 3, 5)]


def test_arpa_round_trip(models, corpus, tmp_path):
    held_out = structured_corpus(100, 3) + [np.array([0, UNK_ID, 10**6])]
    for order, lm in models.items():
        path = tmp_path / f"lm{order}.arpa"
        lm.write_arpa(path, lambda i: f"w{i}")
        text = path.read_text()
        assert text.startswith(f"\\data\\\nngram 1={V}\n") and text.endswith("\n\\end\\\n")
        assert f"\n\\{order}-grams:\n" in text and "\n-99\t<s>" in text and "\t</s>" in text
        arpa = KneserNeyLM.read_arpa(
            path, lambda t: int(t[1:]), V, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID
        )
        # numbers are printed at float32 precision (~7 significant digits)
        np.testing.assert_allclose(
            arpa.sentence_logprobs(held_out), lm.sentence_logprobs(held_out), rtol=0, atol=1e-5
        )
        assert arpa.next_token_probs([BOS_ID, 4]).sum() == pytest.approx(1.0, abs=1e-5)


def test_arpa_backoff_semantics_by_hand(tmp_path):
    # A hand-written backoff model: p(w | h) = p(h w) if listed, else bow(h) * p(w | h').
    # The trigram "<s> a a" is listed without its suffix "a a" (allowed in ARPA files).
    path = tmp_path / "hand.arpa"
    path.write_text(
        "\\data\\\nngram 1=4\nngram 2=2\nngram 3=1\n\n"
        "\\1-grams:\n-99\t<s>\t-0.5\n-0.30103\ta\t-0.2\n-0.60206\t</s>\n-0.60206\t<unk>\n\n"
        "\\2-grams:\n-0.1\t<s> a\t-0.3\n-0.4\ta </s>\n\n"
        "\\3-grams:\n-0.05\t<s> a a\n\n\\end\\\n"
    )
    lm = KneserNeyLM.read_arpa(
        path, {"a": 4}.__getitem__, 6, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID
    )
    assert lm.order == 3
    assert lm.prob([BOS_ID], 4) == pytest.approx(10**-0.1)
    assert lm.prob([BOS_ID], EOS_ID) == pytest.approx(10**-0.5 * 10**-0.60206)
    assert lm.prob([4], 4) == pytest.approx(10**-0.2 * 10**-0.30103)
    assert lm.prob([BOS_ID, 4], 4) == pytest.approx(10**-0.05)
    assert lm.prob([BOS_ID, 4], EOS_ID) == pytest.approx(10**-0.3 * 10**-0.4)
    assert lm.prob([4, 4], 4) == lm.prob([4], 4)  # context "a a" is not listed
    assert lm.prob([4], 5) == lm.prob([4], UNK_ID)  # id 5 is not in the file: scored as <unk>
    logp = lm.sentence_logprobs([np.array([4, 4])])
    np.testing.assert_allclose(logp / np.log(10), [-0.1, -0.05, -0.4])
