"""Confidence intervals and paired significance tests for two models on one test set.

Translation uses sacreBLEU's paired bootstrap resampling (the Moses
`bootstrap-hypothesis-difference-significance.pl` procedure). Language models get the same
procedure over test lines: resample lines with replacement, recompute bits per character of
both models on each resample, and ask how often the (centred) resampled difference is at least
as large as the observed one. Both p-values are two-sided; "the challenger wins" means it is
better on the full test set and p < alpha.
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


def _resampled_bpc(line_nll: np.ndarray, chars: np.ndarray, index: np.ndarray) -> np.ndarray:
    return line_nll[index].sum(axis=1) / math.log(2) / chars[index].sum(axis=1)


def _indices(n_lines: int, n_samples: int) -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, n_lines, size=(n_samples, n_lines))


def bits_per_char_interval(
    line_nll: np.ndarray, chars: np.ndarray, n_samples: int = N_SAMPLES
) -> tuple[float, float]:
    """95% bootstrap (percentile) confidence interval of bits per character over lines."""
    samples = _resampled_bpc(
        np.asarray(line_nll), np.asarray(chars), _indices(len(chars), n_samples)
    )
    return float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


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
    index = _indices(len(chars), n_samples)
    a = _resampled_bpc(challenger_nll, chars, index)
    b = _resampled_bpc(champion_nll, chars, index)
    total = chars.sum() * math.log(2)
    observed = abs(challenger_nll.sum() / total - champion_nll.sum() / total)
    diffs = np.abs(a - b)
    centred = diffs - diffs.mean()
    p_value = (np.sum(centred >= observed) + 1) / (n_samples + 1)
    return Comparison(
        "test_bits_per_char",
        float(challenger_nll.sum() / total),
        float(champion_nll.sum() / total),
        float(p_value),
        (float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5))),
        (float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))),
        n_samples,
    )
