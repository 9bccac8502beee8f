"""Score a trained model on the test split, the same way for every model of a task."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from seqmodels.config import ExperimentConfig
from seqmodels.data import read_split
from seqmodels.metrics import language_model_metrics, translation_metrics
from seqmodels.predictor import load_predictor


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    signatures: dict[str, str] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)  # MT: hypotheses; LM: samples


def evaluate_model(
    model_dir: Path, parquet: Path, experiment: ExperimentConfig
) -> EvaluationResult:
    predictor = load_predictor(model_dir)
    ev = experiment.evaluation
    if experiment.task == "translation":
        test = read_split(parquet, "test", ["src", "tgt"])
        hypotheses = predictor.translate(test["src"])
        scores, signatures = translation_metrics(hypotheses, test["tgt"])
        return EvaluationResult(scores, signatures, hypotheses)
    lines = read_split(parquet, "test", ["text"])["text"]
    nll, n_tokens = predictor.total_nll(lines)
    samples = [
        prompt + continuation
        for prompt, continuation in zip(
            ev.sample_prompts,
            predictor.generate(ev.sample_prompts, max_new_tokens=ev.sample_tokens, seed=0),
            strict=True,
        )
    ]
    return EvaluationResult(language_model_metrics(nll, n_tokens, lines), outputs=samples)
