"""Score a trained model on the test split, the same way for every model of a task."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from seqmodels.config import ExperimentConfig
from seqmodels.data.splits import read_split
from seqmodels.evaluation.metrics import language_model_metrics, translation_metrics
from seqmodels.evaluation.rouge import lead_summary, summarization_metrics
from seqmodels.evaluation.significance import bits_per_char_interval, bleu_interval
from seqmodels.models.folder import load_predictor


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    signatures: dict[str, str] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)  # MT: hypotheses; LM: samples
    references: list[str] = field(default_factory=list)  # MT: the raw test references
    line_nll: list[float] = field(default_factory=list)  # LM: nats per test line (+ its end)
    line_chars: list[int] = field(default_factory=list)  # LM: characters per line (+ 1)
    test_digest: str = ""  # sha256 of the test text: paired tests need the same test set
    # Summarisation: per-example ROUGE F1 x100 of each metric, for the paired test.
    per_example: dict[str, list[float]] = field(default_factory=dict)
    signature_tool: str = "sacrebleu"  # the signatures' tags: <tool>.<name>.signature

    def signature_tags(self) -> dict[str, str]:
        return {f"{self.signature_tool}.{k}.signature": v for k, v in self.signatures.items()}


class LeadBaseline:
    """The lead-N summariser: the first N words of the source. Scored beside the trained
    models so a reader sees what a model adds over copying the start; never registered."""

    can_generate = False
    truncated_sources = 0

    def __init__(self, n_words: int):
        self.n_words = n_words

    def summarize(self, texts: list[str]) -> list[str]:
        return [lead_summary(text, self.n_words) for text in texts]


def test_set_digest(columns: list[list[str]]) -> str:
    digest = hashlib.sha256()
    for column in columns:
        for line in column:
            digest.update(line.encode("utf-8") + b"\n")
        digest.update(b"\x00")
    return digest.hexdigest()


def evaluate_model(
    model_dir: Path, parquet: Path, experiment: ExperimentConfig
) -> EvaluationResult:
    return evaluate_predictor(load_predictor(model_dir), parquet, experiment)


def evaluate_predictor(predictor, parquet: Path, experiment: ExperimentConfig) -> EvaluationResult:
    """Test-split metrics of a loaded predictor (see seqmodels.inference.predictors)."""
    ev = experiment.evaluation
    if experiment.task == "summarization":
        return evaluate_summaries(predictor, parquet, experiment)
    if experiment.task == "translation":
        test = read_split(parquet, "test", ["src", "tgt"])
        hypotheses = predictor.translate(test["src"])
        scores, signatures = translation_metrics(hypotheses, test["tgt"])
        low, high = bleu_interval(hypotheses, test["tgt"], ev.bootstrap_samples)
        scores.update(test_bleu_ci_low=low, test_bleu_ci_high=high)
        return EvaluationResult(
            scores,
            signatures,
            hypotheses,
            references=test["tgt"],
            test_digest=test_set_digest([test["src"], test["tgt"]]),
        )
    lines = read_split(parquet, "test", ["text"])["text"]
    line_nll = np.asarray(predictor.line_nll(lines), dtype=np.float64)
    chars = np.array([len(line) + 1 for line in lines])
    scores = language_model_metrics(float(line_nll.sum()), predictor.n_predicted(lines), lines)
    low, high = bits_per_char_interval(line_nll, chars, ev.bootstrap_samples)
    scores.update(test_bits_per_char_ci_low=low, test_bits_per_char_ci_high=high)
    # A masked LM's pseudo-log-likelihood gets names of its own ("test_pll_..."): it is not
    # comparable with a causal model's likelihood.
    prefix = f"test_{predictor.metric_prefix}"
    scores = {prefix + k.removeprefix("test_"): v for k, v in scores.items()}
    samples = []
    if predictor.can_generate:
        continuations = predictor.generate(
            ev.sample_prompts, max_new_tokens=ev.sample_tokens, seed=0
        )
        samples = [p + c for p, c in zip(ev.sample_prompts, continuations, strict=True)]
    return EvaluationResult(
        scores,
        outputs=samples,
        line_nll=line_nll.tolist(),
        line_chars=chars.tolist(),
        test_digest=test_set_digest([lines]),
    )


def evaluate_summaries(predictor, parquet: Path, experiment: ExperimentConfig) -> EvaluationResult:
    """ROUGE of a summariser on the test split: the single reference (the `tgt` column) is
    the primary protocol; with extra references (a `refs` column) also the best of all.
    Every test example is scored: long sources are cut to the model's limit, and counted."""
    columns = ["src", "tgt"]
    if "refs" in pq.read_schema(parquet).names:
        columns.append("refs")
    test = read_split(parquet, "test", columns)
    summaries = predictor.summarize(test["src"])
    scores, signatures, per_example = summarization_metrics(
        summaries,
        test["tgt"],
        test.get("refs"),
        n_samples=experiment.evaluation.bootstrap_samples,
    )
    scores["test_truncated_sources"] = float(predictor.truncated_sources)
    scores["test_examples"] = float(len(summaries))
    return EvaluationResult(
        scores,
        signatures,
        summaries,
        references=test["tgt"],
        test_digest=test_set_digest([test["src"], test["tgt"]]),
        per_example=per_example,
        signature_tool="rouge_score",
    )


def metrics_markdown(model_name: str, result: EvaluationResult) -> str:
    """The test metrics as a Markdown table, with the sacreBLEU signatures below it."""
    table = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(result.metrics.items()))
    signatures = "".join(f"- {k} signature: `{s}`\n" for k, s in result.signatures.items())
    return (
        f"# {model_name}: test metrics\n\n| metric | value |\n|---|---:|\n{table}\n\n{signatures}"
    )


def outputs_record(result: EvaluationResult) -> dict:
    """What a later paired test needs from this evaluation (saved as evaluation/outputs.json)."""
    return {
        "test_digest": result.test_digest,
        "hypotheses": result.outputs if result.references else [],
        "references": result.references,
        "line_nll": result.line_nll,
        "line_chars": result.line_chars,
        "per_example": result.per_example,
    }
