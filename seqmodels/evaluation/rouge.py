"""ROUGE of summaries, with bootstrap confidence intervals and sacreBLEU-style signatures.

Scores come from Google's `rouge-score` package (`rouge_score.rouge_scorer.RougeScorer`), the
implementation behind published summarisation numbers (PEGASUS and most papers since). Every
setting is written into a signature string, so two numbers can be checked for comparability:

    rouge-score:0.1.2|stem:yes|tok:default|lsum:newline|agg:mean-f1|scale:100|refs:1|
    ci:bootstrap-1000-seed12345          (one line; wrapped here)

- `stem:yes`: rouge-score's Porter stemmer (nltk's code, no nltk data) on tokens longer than
  three characters, so "cats running" matches "cat run";
- `tok:default`: rouge-score's tokenizer: lowercase, anything outside [a-z0-9] separates
  tokens (non-ASCII letters are dropped: right for English subject lines, not for other
  languages);
- `lsum:newline`: rougeLsum's summary-level LCS needs sentences, and here a sentence is a line
  (rouge-score's own convention). Its `split_summaries=True` would split with nltk's punkt,
  which is not installed and must not download at run time. A one-line summary is one
  sentence, so for AESLC subject lines rougeLsum equals rougeL; put one sentence per line in
  hypotheses and references to get the sentence-level score;
- `agg:mean-f1`, `scale:100`: the F1 of each example, averaged over examples, times 100 (not
  rouge-score's BootstrapAggregator, whose "mid" is a median of unseeded resamples);
- `refs`: `1` for the primary protocol, `best-of-N` for the secondary one (below);
- `ci`: 95% percentile bootstrap interval over examples, resampled as every other interval of
  this package (significance.bootstrap_indices: fixed seed, reproducible).

Two protocols, never to be mixed in one comparison:
- primary, `test_rouge1`, `test_rouge2`, `test_rougeL`, `test_rougeLsum`: against the single
  reference of each example (AESLC's `@subject` line), as in the PEGASUS paper;
- secondary, `test_rouge1_bestref` etc.: per example and per ROUGE type the maximum F1 over the
  reference and its extra references (AESLC's annotations), as AESLC's authors scored the
  multi-reference test set. Always at least the primary score, so not comparable with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import version

import numpy as np
from rouge_score import rouge_scorer

from seqmodels.evaluation.significance import N_SAMPLES, SEED, mean_interval

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
BESTREF = "_bestref"  # suffix of the secondary (best-of-references) metric names


def new_scorer() -> rouge_scorer.RougeScorer:
    # split_summaries stays False: True needs nltk's punkt data (see the module docstring).
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True, split_summaries=False)


def reference_f1(
    scorer: rouge_scorer.RougeScorer, hypothesis: str, references: Sequence[str]
) -> list[dict[str, float]]:
    """F1 x100 of `hypothesis` against each reference, one {rouge type: F1} per reference."""
    # rouge-score's argument order is (target, prediction): precision is over the hypothesis.
    scored = [scorer.score(reference, hypothesis) for reference in references]
    return [{t: 100.0 * s[t].fmeasure for t in ROUGE_TYPES} for s in scored]


def _extra_lists(
    n_examples: int, extra_references: Sequence[Sequence[str] | None] | None
) -> list[list[str]]:
    """The extra references of each example, blank ones dropped (an empty annotation is not a
    reference: it would only add a zero to a maximum); [] where there are none."""
    if extra_references is None:
        return [[] for _ in range(n_examples)]
    if len(extra_references) != n_examples:
        raise ValueError(
            f"{n_examples} hypotheses for {len(extra_references)} lists of extra references"
        )
    return [[r for r in (extra or []) if r and r.strip()] for extra in extra_references]


def per_example_f1(
    hypotheses: Sequence[str],
    references: Sequence[str],
    extra_references: Sequence[Sequence[str] | None] | None = None,
) -> dict[str, list[float]]:
    """Per-example F1 x100 of every metric: `test_<type>` against the single reference and,
    when any example has extra references, `test_<type>_bestref`, the maximum over all."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    extras = _extra_lists(len(hypotheses), extra_references)
    with_bestref = any(extras)
    names = [f"test_{t}" for t in ROUGE_TYPES]
    if with_bestref:
        names += [f"test_{t}{BESTREF}" for t in ROUGE_TYPES]
    per_example: dict[str, list[float]] = {name: [] for name in names}
    scorer = new_scorer()
    for hypothesis, reference, extra in zip(hypotheses, references, extras, strict=True):
        f1 = reference_f1(scorer, hypothesis, [reference, *extra])
        for t in ROUGE_TYPES:
            per_example[f"test_{t}"].append(f1[0][t])
            if with_bestref:
                # Per type: the best reference for ROUGE-1 need not be the best for ROUGE-L
                # (rouge-score's score_multi does the same).
                per_example[f"test_{t}{BESTREF}"].append(max(s[t] for s in f1))
    return per_example


def rouge_signature(refs: str, n_samples: int = N_SAMPLES) -> str:
    """The settings behind a ROUGE number; `refs`: "1" or "best-of-N"."""
    return "|".join(
        [
            f"rouge-score:{version('rouge-score')}",
            "stem:yes",
            "tok:default",
            "lsum:newline",
            "agg:mean-f1",
            "scale:100",
            f"refs:{refs}",
            f"ci:bootstrap-{n_samples}-seed{SEED}",
        ]
    )


def best_of_label(extra_references: Sequence[Sequence[str] | None]) -> str:
    """`best-of-4`, or `best-of-2..4` when examples have different numbers of references."""
    counts = sorted(
        {1 + len(extra) for extra in _extra_lists(len(extra_references), extra_references)}
    )
    if len(counts) == 1:
        return f"best-of-{counts[0]}"
    return f"best-of-{counts[0]}..{counts[-1]}"


def summarization_metrics(
    hypotheses: Sequence[str],
    references: Sequence[str],
    extra_references: Sequence[Sequence[str] | None] | None = None,
    n_samples: int = N_SAMPLES,
) -> tuple[dict[str, float], dict[str, str], dict[str, list[float]]]:
    """ROUGE-1/2/L/Lsum of summaries; returns (scores, signatures, per_example).

    scores: `test_<type>` (mean F1 x100 against `references`) with `_ci_low`/`_ci_high`, and
    the same for `test_<type>_bestref` when `extra_references` (one list per example) has any.
    signatures: {"rouge": ..., "rouge_bestref": ...} (the second with the bestref metrics).
    per_example: the per-example F1 x100 of each metric, for a later paired test.
    """
    per_example = per_example_f1(hypotheses, references, extra_references)
    scores: dict[str, float] = {}
    for name, values in per_example.items():
        low, high = mean_interval(np.asarray(values), n_samples)
        scores[name] = float(np.mean(values))
        scores[f"{name}_ci_low"], scores[f"{name}_ci_high"] = low, high
    signatures = {"rouge": rouge_signature("1", n_samples)}
    if f"test_rouge1{BESTREF}" in per_example:
        signatures[f"rouge{BESTREF}"] = rouge_signature(best_of_label(extra_references), n_samples)
    return scores, signatures, per_example


def lead_summary(text: str, n_words: int) -> str:
    """The lead-N baseline: the first `n_words` whitespace-separated words of `text`.

    What a reader compares a trained summariser against: a model that does not beat copying
    the opening words of the email has learnt nothing worth its cost.
    """
    if n_words < 1:
        raise ValueError(f"n_words must be at least 1, not {n_words}")
    return " ".join(text.split()[:n_words])
