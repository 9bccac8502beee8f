"""Evaluation metrics that compare across models and vocabularies.

Language models: every model reports the natural-log likelihood it gives the same test text,
and it is normalised three ways. Each line ends with an end-of-line event that every model
predicts (EOS for neural models, </s> for n-grams), so it is counted as one extra token, word
and character per line:
- `test_ppl_per_token`: exp(NLL / predicted tokens), only comparable for the same vocabulary;
- `test_ppl_per_word`: exp(NLL / (whitespace words + lines));
- `test_bits_per_char`: NLL / ln 2 / (characters + lines), the vocabulary-free number.
"""

from __future__ import annotations

import math

import sacrebleu


def text_units(lines: list[str]) -> tuple[int, int]:
    """(words, characters) of `lines`, each line's end counted as one word and one character."""
    words = sum(len(line.split()) + 1 for line in lines)
    chars = sum(len(line) + 1 for line in lines)
    return words, chars


def language_model_metrics(nll_nats: float, n_tokens: int, lines: list[str]) -> dict[str, float]:
    words, chars = text_units(lines)
    return {
        "test_nll_nats": nll_nats,
        "test_tokens": float(n_tokens),
        "test_ppl_per_token": math.exp(nll_nats / n_tokens),
        "test_ppl_per_word": math.exp(nll_nats / words),
        "test_bits_per_char": nll_nats / math.log(2) / chars,
        "test_nats_per_char": nll_nats / chars,
    }


def translation_metrics(
    hypotheses: list[str], references: list[str]
) -> tuple[dict[str, float], dict[str, str]]:
    """sacreBLEU BLEU, chrF, chrF++ and TER on detokenized text; returns (scores, signatures)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    metrics = {
        "bleu": sacrebleu.metrics.BLEU(),
        "chrf": sacrebleu.metrics.CHRF(),
        "chrf_pp": sacrebleu.metrics.CHRF(word_order=2),
        "ter": sacrebleu.metrics.TER(),
    }
    scores, signatures = {}, {}
    for name, metric in metrics.items():
        scores[f"test_{name}"] = metric.corpus_score(hypotheses, [references]).score
        signatures[name] = str(metric.get_signature())
    return scores, signatures
