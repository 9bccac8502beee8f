"""The `summarization` task without Prefect or MLflow: its config, the lead baseline, ROUGE
scoring of a predictor on a test split, truncation counts, promotion by ROUGE-L and the
comparison rows of baselines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from seqmodels.config import ConfigError, load_config
from seqmodels.evaluation.comparison import BASELINE, build_comparison, report_markdown
from seqmodels.evaluation.promotion import compare_with_champion, decide
from seqmodels.evaluation.scoring import LeadBaseline, evaluate_predictor, outputs_record
from seqmodels.training.batching import truncate_sources
from tests.conftest import REPO

CONFIG = REPO / "configs/summarization.yaml"


def _experiment(**evaluation):
    exp = load_config(CONFIG).experiments["sum-aeslc"]
    return exp.model_copy(update={"evaluation": exp.evaluation.model_copy(update=evaluation)})


def _test_split(path: Path, rows: list[tuple[str, str, list[str]]]) -> Path:
    table = pa.table(
        {
            "id": list(range(len(rows))),
            "split": ["test"] * len(rows),
            "src": [r[0] for r in rows],
            "tgt": [r[1] for r in rows],
            "refs": [r[2] for r in rows],
        }
    )
    pq.write_table(table, path)
    return path


def test_the_summarisation_profile_decides_by_rouge_l_and_scores_a_lead_baseline():
    exp = load_config(CONFIG).experiments["sum-aeslc"]
    assert exp.task == "summarization" and exp.primary_metric == "test_rougeL"
    assert exp.higher_is_better and exp.text_columns == ["src", "tgt"]
    assert exp.evaluation.lead_words == 6 and exp.evaluation.max_len_a == 0.0
    assert _experiment(rouge_metric="rouge2").primary_metric == "test_rouge2"


def test_a_summarisation_setting_in_a_translation_experiment_is_a_config_error(tmp_path):
    config = yaml.safe_load((REPO / "configs/default.yaml").read_text())
    config["experiments"]["mt-multi30k-de-en"]["evaluation"]["lead_words"] = 5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="lead_words: the lead baseline is for summarization"):
        load_config(path)
    config = yaml.safe_load((REPO / "configs/default.yaml").read_text())
    lm = config["experiments"]["lm-shakespeare"]
    lm["task"] = "summarization"
    lm["models"] = {"lstm": {"type": "lstm_seq2seq"}}
    lm["evaluation"] = {}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="does not fit a monolingual corpus"):
        load_config(path)


def test_long_sources_are_cut_not_dropped_and_counted():
    sources = [np.arange(3), np.arange(10), np.arange(5)]
    cut, count = truncate_sources(sources, 5)
    assert [len(s) for s in cut] == [3, 5, 5] and count == 1
    assert truncate_sources(sources, None) == (sources, 0)


def test_the_lead_baseline_is_scored_with_rouge_on_every_test_example(tmp_path):
    parquet = _test_split(
        tmp_path / "corpus.parquet",
        [
            # lead-3 "the cat sat" = the reference: F1 100
            ("the cat sat on the mat all day", "the cat sat", ["a cat sat down"]),
            # lead-3 "budget meeting moved" vs "meeting moved to friday": 2 common unigrams,
            # P = 2/3, R = 2/4, F1 = 2PR/(P+R) = 4/7 = 57.14
            ("budget meeting moved to friday at noon", "meeting moved to friday", []),
        ],
    )
    result = evaluate_predictor(LeadBaseline(3), parquet, _experiment(lead_words=3))
    assert result.outputs == ["the cat sat", "budget meeting moved"]
    assert result.per_example["test_rouge1"] == pytest.approx([100.0, 400 / 7], abs=1e-6)
    assert result.metrics["test_rouge1"] == pytest.approx((100 + 400 / 7) / 2, abs=1e-6)
    assert result.metrics["test_examples"] == 2.0
    # Best of all references: never below the single-reference score.
    assert result.metrics["test_rouge1_bestref"] >= result.metrics["test_rouge1"]
    assert set(result.signature_tags()) >= {"rouge_score.rouge.signature"}
    assert outputs_record(result)["per_example"]["test_rougeL"] == result.per_example["test_rougeL"]


def test_a_challenger_becomes_champion_only_when_rouge_l_is_significantly_better():
    exp = _experiment(bootstrap_samples=500)
    rng = np.random.default_rng(0)
    champion = {"per_example": {"test_rougeL": list(rng.uniform(0, 40, 300))}}
    better = {
        "per_example": {"test_rougeL": [v + 10 for v in champion["per_example"]["test_rougeL"]]}
    }
    same = {"per_example": {"test_rougeL": list(champion["per_example"]["test_rougeL"])}}
    comparison = compare_with_champion(better, champion, exp)
    assert comparison.metric == "test_rougeL" and comparison.p_value < 0.05
    assert decide(comparison, exp.higher_is_better, 0.05)[0]
    promoted, reason = decide(compare_with_champion(same, champion, exp), True, 0.05)
    assert not promoted and "not better" in reason


def test_the_comparison_lists_a_baseline_after_the_versions_and_says_it_is_not_registered():
    records = [
        {"version": BASELINE, "run_name": "lead-6", "metrics": {"test_rougeL": 12.0}},
        {"version": "2", "run_name": "transformer", "metrics": {"test_rougeL": 20.0}},
        {"version": "1", "run_name": "lstm", "metrics": {"test_rougeL": 18.0}},
    ]
    comparison = build_comparison("sum-aeslc", records, "test_rougeL")
    assert [r["version"] for r in comparison["rows"]] == ["1", "2", BASELINE]
    assert comparison["higher_is_better"]
    report = report_markdown(comparison, {}, "sqlite:///x.db")
    assert "never registered" in report and "single reference" in report
