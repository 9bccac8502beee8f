"""Confidence intervals and paired significance tests for two models on one test set.

Translation uses sacreBLEU's paired bootstrap resampling (the Moses
`bootstrap-hypothesis-difference-significance.pl` procedure). Language models get the same
procedure over test lines: resample lines with replacement, recompute bits per character of
both models on each resample, and ask how often the (centred) resampled difference is at least
as large as the observed one. Any metric that is a mean of per-example scores (ROUGE F1 per
summary) gets the same test through `compare_mean_scores`. All p-values are two-sided; "the
challenger wins" means it is better on the full test set and p < alpha.

Every bootstrap here draws its resamples from `bootstrap_indices`, with one fixed seed, so the
intervals and tests of one test set are reproducible and resample the same examples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import sacrebleu
from sacrebleu.significance import PairedTest

N_SAMPLES = 1000
SEED = 12345  # sacreBLEU's default seed, so our numbers match `sacrebleu --paired-bs`


@dataclass
class Comparison:
    metric: str
    challenger: float
    champion: float
    p_value: float
    challenger_ci: tuple[float, float]
    champion_ci: tuple[float, float]
    n_samples: int

    def as_dict(self) -> dict:
        return asdict(self)


def _interval(mean: float, half_width: float) -> tuple[float, float]:
    return (mean - half_width, mean + half_width)


def bleu_interval(
    hypotheses: list[str], references: list[str], n_samples: int = N_SAMPLES
) -> tuple[float, float]:
    """95% bootstrap confidence interval of corpus BLEU."""
    test = PairedTest(
        [("system", hypotheses)],
        {"bleu": sacrebleu.metrics.BLEU()},
        [references],
        test_type="bs",
        n_samples=n_samples,
    )
    _, scores = test()
    result = scores["BLEU"][0]
    return _interval(result.mean, result.ci)


def compare_translations(
    challenger: list[str],
    champion: list[str],
    references: list[str],
    n_samples: int = N_SAMPLES,
) -> Comparison:
    """Paired bootstrap test of BLEU: the champion is the baseline system."""
    test = PairedTest(
        [("champion", champion), ("challenger", challenger)],
        {"bleu": sacrebleu.metrics.BLEU()},
        [references],
        test_type="bs",
        n_samples=n_samples,
    )
    _, scores = test()
    base, other = scores["BLEU"]
    return Comparison(
        "test_bleu",
        other.score,
        base.score,
        float(other.p_value),
        _interval(other.mean, other.ci),
        _interval(base.mean, base.ci),
        n_samples,
    )


def bootstrap_indices(n_items: int, n_samples: int = N_SAMPLES) -> np.ndarray:
    """Item indices of `n_samples` resamples with replacement, shape (n_samples, n_items).

    Always seeded with SEED: the same test set is resampled the same way by every interval and
    paired test, so reruns give the same numbers.
    """
    if n_items < 1:
        raise ValueError("cannot bootstrap an empty test set")
    return np.random.default_rng(SEED).integers(0, n_items, size=(n_samples, n_items))


def percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of bootstrap replicates."""
    return float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


def mean_interval(scores: np.ndarray, n_samples: int = N_SAMPLES) -> tuple[float, float]:
    """95% bootstrap (percentile) confidence interval of the mean of per-example scores."""
    scores = np.asarray(scores, dtype=np.float64)
    return percentile_interval(scores[bootstrap_indices(len(scores), n_samples)].mean(axis=1))


def paired_p_value(observed: float, resampled_a: np.ndarray, resampled_b: np.ndarray) -> float:
    """Two-sided p of the paired bootstrap: how often the centred resampled absolute difference
    reaches the observed one. Centring makes the replicates follow the null hypothesis (no
    difference) while keeping their spread; +1 on both sides keeps p above zero."""
    diffs = np.abs(resampled_a - resampled_b)
    centred = diffs - diffs.mean()
    return float((np.sum(centred >= observed) + 1) / (len(diffs) + 1))


def _resampled_bpc(line_nll: np.ndarray, chars: np.ndarray, index: np.ndarray) -> np.ndarray:
    return line_nll[index].sum(axis=1) / math.log(2) / chars[index].sum(axis=1)


def bits_per_char_interval(
    line_nll: np.ndarray, chars: np.ndarray, n_samples: int = N_SAMPLES
) -> tuple[float, float]:
    """95% bootstrap (percentile) confidence interval of bits per character over lines."""
    samples = _resampled_bpc(
        np.asarray(line_nll), np.asarray(chars), bootstrap_indices(len(chars), n_samples)
    )
    return percentile_interval(samples)


def compare_language_models(
    challenger_nll: np.ndarray,
    champion_nll: np.ndarray,
    chars: np.ndarray,
    n_samples: int = N_SAMPLES,
) -> Comparison:
    """Paired bootstrap over test lines of bits per character (lower is better)."""
    challenger_nll, champion_nll = np.asarray(challenger_nll), np.asarray(champion_nll)
    chars = np.asarray(chars)
    if not (len(challenger_nll) == len(champion_nll) == len(chars)):
        raise ValueError("both models must be scored on the same test lines")
    index = bootstrap_indices(len(chars), n_samples)
    a = _resampled_bpc(challenger_nll, chars, index)
    b = _resampled_bpc(champion_nll, chars, index)
    total = chars.sum() * math.log(2)
    challenger, champion = challenger_nll.sum() / total, champion_nll.sum() / total
    return Comparison(
        "test_bits_per_char",
        float(challenger),
        float(champion),
        paired_p_value(abs(challenger - champion), a, b),
        percentile_interval(a),
        percentile_interval(b),
        n_samples,
    )


def compare_mean_scores(
    challenger: np.ndarray, champion: np.ndarray, metric: str, n_samples: int = N_SAMPLES
) -> Comparison:
    """Paired bootstrap over test examples of a metric that is the mean of per-example scores
    (e.g. ROUGE F1). The test is two-sided: whether higher is better is the caller's decision
    (see promotion.decide)."""
    challenger = np.asarray(challenger, dtype=np.float64)
    champion = np.asarray(champion, dtype=np.float64)
    if len(challenger) != len(champion):
        raise ValueError(
            f"both systems must be scored on the same test examples: "
            f"{len(challenger)} challenger scores, {len(champion)} champion scores"
        )
    index = bootstrap_indices(len(challenger), n_samples)
    a, b = challenger[index].mean(axis=1), champion[index].mean(axis=1)
    return Comparison(
        metric,
        float(challenger.mean()),
        float(champion.mean()),
        paired_p_value(abs(challenger.mean() - champion.mean()), a, b),
        percentile_interval(a),
        percentile_interval(b),
        n_samples,
    )
