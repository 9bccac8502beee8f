"""ROUGE for summarisation (seqmodels.evaluation.rouge) and the paired bootstrap over
per-example scores (significance.compare_mean_scores), on hand-computed cases."""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
import pytest

from seqmodels.evaluation.rouge import lead_summary, summarization_metrics
from seqmodels.evaluation.significance import compare_mean_scores, mean_interval

WORDS = "meeting budget friday report call draft review deal gas power price update".split()


def _scores(hypothesis: str, reference: str) -> dict[str, float]:
    scores, _, _ = summarization_metrics([hypothesis], [reference], n_samples=10)
    return scores


def _corpus(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`n` made-up subject lines and noisy copies of them (some words replaced)."""
    rng = np.random.default_rng(seed)
    refs = [" ".join(rng.choice(WORDS, size=rng.integers(3, 7))) for _ in range(n)]
    hyps = [" ".join(w if rng.random() < 0.6 else "the" for w in r.split()) for r in refs]
    return hyps, refs


# --- ROUGE scores ---------------------------------------------------------------------------


def test_rouge_f1_of_a_hypothesis_missing_the_last_word():
    s = _scores("the cat sat", "the cat sat down")
    # ROUGE-1: 3 shared unigrams; P = 3/3, R = 3/4, F1 = 2PR/(P+R) = 1.5/1.75 = 6/7.
    assert s["test_rouge1"] == pytest.approx(100 * 6 / 7)  # 85.71
    # ROUGE-2: bigrams "the cat", "cat sat" shared; P = 2/2, R = 2/3, F1 = (4/3)/(5/3) = 4/5.
    assert s["test_rouge2"] == pytest.approx(80.0)
    # ROUGE-L: the longest common subsequence is "the cat sat", so as ROUGE-1.
    assert s["test_rougeL"] == pytest.approx(100 * 6 / 7)
    # One line is one sentence: summary-level ROUGE-L is ROUGE-L.
    assert s["test_rougeLsum"] == pytest.approx(s["test_rougeL"])


def test_words_are_stemmed_and_lowercased():
    # Porter: "cats" -> "cat", "running" -> "run"; so every unigram and the bigram match.
    s = _scores("Cats running", "cat run")
    assert s["test_rouge1"] == pytest.approx(100.0)
    assert s["test_rouge2"] == pytest.approx(100.0)
    assert _scores("dogs", "cat")["test_rouge1"] == 0.0


def test_rougelsum_reads_newline_separated_sentences():
    hypothesis, reference = "dog ran cat sat", "cat sat\ndog ran"
    s = _scores(hypothesis, reference)
    # ROUGE-L sees one sequence: LCS("dog ran cat sat", "cat sat dog ran") has 2 words,
    # P = R = 2/4, F1 = 50.
    assert s["test_rougeL"] == pytest.approx(50.0)
    # ROUGE-Lsum matches each reference line on its own: "cat sat" 2 hits, "dog ran" 2 hits,
    # 4 in all; P = 4/4, R = 4/4, F1 = 100.
    assert s["test_rougeLsum"] == pytest.approx(100.0)


def test_best_of_references_takes_the_maximum_per_example_and_per_type():
    hypotheses = ["red fox ate egg", "the cat sat"]
    references = ["egg ate fox red", "the cat sat"]
    extra = [["red fox saw owl"], ["dog"]]
    scores, signatures, per_example = summarization_metrics(
        hypotheses, references, extra, n_samples=50
    )
    # Example 1 against "egg ate fox red": every unigram (100), no bigram (0), LCS 1 word:
    # P = R = 1/4, F1 = 25. Against "red fox saw owl": unigrams red, fox: 2/4 (50); bigram
    # "red fox": 1 of 3 each side (33.33); LCS "red fox": 50.
    # The best reference differs by type: ROUGE-1 from the first, ROUGE-2 and L the second.
    assert per_example["test_rouge1"][0] == pytest.approx(100.0)
    assert per_example["test_rouge2"][0] == pytest.approx(0.0)
    assert per_example["test_rougeL"][0] == pytest.approx(25.0)
    assert per_example["test_rouge1_bestref"][0] == pytest.approx(100.0)
    assert per_example["test_rouge2_bestref"][0] == pytest.approx(100 / 3)
    assert per_example["test_rougeL_bestref"][0] == pytest.approx(50.0)
    # Example 2: the reference is exact; a worse extra reference does not pull it down.
    assert per_example["test_rouge1_bestref"][1] == pytest.approx(100.0)
    assert scores["test_rougeL_bestref"] == pytest.approx((50.0 + 100.0) / 2)
    assert scores["test_rougeL"] == pytest.approx((25.0 + 100.0) / 2)
    assert set(signatures) == {"rouge", "rouge_bestref"}


def test_without_extra_references_there_are_no_bestref_metrics():
    hypotheses, references = ["the cat sat", "a dog"], ["the cat sat down", "a dog ran"]
    for extra in (None, [[], None], [[""], ["  "]]):  # blank annotations are no references
        scores, signatures, per_example = summarization_metrics(
            hypotheses, references, extra, n_samples=20
        )
        assert not any("bestref" in k for k in [*scores, *per_example])
        assert list(signatures) == ["rouge"]
    assert set(per_example) == {"test_rouge1", "test_rouge2", "test_rougeL", "test_rougeLsum"}
    assert set(scores) == {
        f"test_{t}{suffix}"
        for t in ("rouge1", "rouge2", "rougeL", "rougeLsum")
        for suffix in ("", "_ci_low", "_ci_high")
    }


def test_lengths_that_differ_are_an_error():
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        summarization_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="2 hypotheses for 3 lists of extra references"):
        summarization_metrics(["a", "b"], ["a", "b"], [[], [], []])


# --- confidence intervals, signatures -------------------------------------------------------


def test_intervals_contain_the_score_shrink_with_more_examples_and_repeat_exactly():
    def width(scores: dict[str, float]) -> float:
        return scores["test_rouge1_ci_high"] - scores["test_rouge1_ci_low"]

    small, _, _ = summarization_metrics(*_corpus(25), n_samples=300)
    large, _, per_example = summarization_metrics(*_corpus(400), n_samples=300)
    for scores in (small, large):
        for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            assert scores[f"test_{t}_ci_low"] < scores[f"test_{t}"] < scores[f"test_{t}_ci_high"]
    assert width(large) < width(small) / 2  # about sqrt(400 / 25) = 4 times narrower
    assert summarization_metrics(*_corpus(400), n_samples=300)[0] == large  # fixed seed
    # The interval is significance.mean_interval of the per-example scores: one bootstrap
    # (same seed, same resampled indices) for every metric of the package.
    low, high = mean_interval(np.asarray(per_example["test_rouge1"]), 300)
    assert (large["test_rouge1_ci_low"], large["test_rouge1_ci_high"]) == (low, high)


def test_signatures_record_the_version_and_every_setting():
    hypotheses, references = ["the cat sat", "a dog"], ["the cat sat down", "a dog ran"]
    _, signatures, _ = summarization_metrics(
        hypotheses, references, [["a", "b", "c"], ["d", "e", "f"]], n_samples=200
    )
    settings = "stem:yes|tok:default|lsum:newline|agg:mean-f1|scale:100"
    rouge_score = f"rouge-score:{version('rouge-score')}"
    assert signatures == {
        "rouge": f"{rouge_score}|{settings}|refs:1|ci:bootstrap-200-seed12345",
        "rouge_bestref": f"{rouge_score}|{settings}|refs:best-of-4|ci:bootstrap-200-seed12345",
    }
    # Examples with different numbers of references: the range is recorded.
    _, signatures, _ = summarization_metrics(hypotheses, references, [["a"], []], n_samples=9)
    assert "|refs:best-of-1..2|ci:bootstrap-9-seed12345" in signatures["rouge_bestref"]


# --- paired test over per-example scores ----------------------------------------------------


def test_a_clearly_better_summariser_wins_the_paired_test():
    rng = np.random.default_rng(0)
    champion = rng.uniform(0, 60, size=300)  # per-example ROUGE-L F1 x100
    challenger = np.clip(champion + rng.normal(8.0, 10.0, size=300), 0, 100)
    c = compare_mean_scores(challenger, champion, "test_rougeL", n_samples=500)
    assert c.metric == "test_rougeL" and c.n_samples == 500
    assert c.challenger == pytest.approx(challenger.mean())
    assert c.champion == pytest.approx(champion.mean())
    assert c.challenger > c.champion and c.p_value < 0.05
    assert c.challenger_ci[0] < c.challenger < c.challenger_ci[1]
    assert c.champion_ci[0] < c.champion < c.champion_ci[1]


def test_identical_summarisers_are_not_significantly_different():
    scores = np.random.default_rng(1).uniform(0, 100, size=200)
    c = compare_mean_scores(scores, scores.copy(), "test_rouge1")
    assert c.challenger == c.champion and c.p_value == pytest.approx(1.0)
    assert c.challenger_ci == c.champion_ci
    with pytest.raises(ValueError, match="200 challenger scores, 3 champion scores"):
        compare_mean_scores(scores, scores[:3], "test_rouge1")


# --- the lead baseline ----------------------------------------------------------------------


def test_lead_summary_is_the_first_words_of_the_body():
    body = "Hi team,\n  the budget meeting moves to Friday.\nThanks"
    assert lead_summary(body, 3) == "Hi team, the"
    assert lead_summary(body, 100) == "Hi team, the budget meeting moves to Friday. Thanks"
    assert lead_summary("", 5) == ""
    with pytest.raises(ValueError, match="at least 1"):
        lead_summary(body, 0)
    # Scored like any summariser: the lead-3 of "the cat sat down" against "the cat sat".
    scores, _, _ = summarization_metrics(
        [lead_summary("the cat sat down", 3)], ["the cat sat"], n_samples=10
    )
    assert scores["test_rouge1"] == pytest.approx(100.0)
