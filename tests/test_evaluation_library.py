"""The evaluation library on its own: promotion decisions and comparison reports from plain
values, with no Prefect flow and no MLflow store (tasks/ only adds those around these calls)."""

from __future__ import annotations

import numpy as np
import pytest

from seqmodels.config import ExperimentConfig
from seqmodels.evaluation.comparison import (
    build_comparison,
    fmt,
    fmt_count,
    report_markdown,
    table_columns,
    write_report,
)
from seqmodels.evaluation.promotion import (
    CHALLENGER,
    CHAMPION,
    compare_with_champion,
    decide,
    decision_markdown,
    decision_summary,
    promotion_tags,
)
from seqmodels.evaluation.significance import Comparison

# A challenger at 30.5 BLEU against a champion at 28.0, p = 0.012 over 1000 resamples.
BETTER = Comparison("test_bleu", 30.5, 28.0, 0.012, (29.6, 31.4), (27.1, 28.9), 1000)


# --- promotion ------------------------------------------------------------------------------


def test_the_first_version_is_promoted_without_a_test():
    assert decide(None, higher_is_better=True, alpha=0.05) == (True, "no champion yet")


def test_a_better_and_significant_challenger_is_promoted():
    assert decide(BETTER, higher_is_better=True, alpha=0.05) == (
        True,
        "better and significant (p=0.0120 < 0.05)",
    )


def test_a_better_but_not_significant_challenger_is_not_promoted():
    promoted, reason = decide(BETTER, higher_is_better=True, alpha=0.01)
    assert not promoted
    assert reason == "better but not significant (p=0.0120 >= 0.01)"


def test_a_worse_challenger_is_not_promoted_however_small_p_is():
    # Same scores, but for a metric where lower is better (bits per character).
    worse = Comparison("test_bits_per_char", 2.1, 1.9, 0.001, (2.0, 2.2), (1.8, 2.0), 1000)
    assert decide(worse, higher_is_better=False, alpha=0.05) == (False, "not better (p=0.0010)")
    tie = Comparison("test_bleu", 28.0, 28.0, 1.0, (27.0, 29.0), (27.0, 29.0), 1000)
    assert decide(tie, higher_is_better=True, alpha=0.05)[0] is False


def test_the_decision_report_shows_both_scores_their_intervals_and_p():
    promoted, reason = decide(BETTER, higher_is_better=True, alpha=0.05)
    report = decision_markdown(
        "mt-de-en",
        "7",
        model_name="transformer",
        champion="5",
        c=BETTER,
        promoted=promoted,
        reason=reason,
    )
    assert report.startswith("# Promotion decision: mt-de-en version 7 (transformer)\n")
    assert "**promoted to champion**: better and significant (p=0.0120 < 0.05)" in report
    assert "| challenger | 7 | 30.5000 | 29.6000 – 31.4000 |" in report
    assert "| champion | 5 | 28.0000 | 27.1000 – 28.9000 |" in report
    assert "Paired bootstrap, 1000 resamples: p = 0.0120." in report


def test_the_first_versions_report_has_no_table():
    report = decision_markdown(
        "mt-de-en",
        "1",
        model_name="lstm",
        champion=None,
        c=None,
        promoted=True,
        reason="no champion yet",
    )
    assert "**promoted to champion**: no champion yet" in report
    assert "|" not in report


def test_promotion_tags_record_the_decision_and_the_test():
    tags = promotion_tags(BETTER, True, "better and significant", champion_version="5", alpha=0.05)
    assert tags == {
        "promotion.decision": "promoted",
        "promotion.reason": "better and significant",
        "promotion.champion_version": "5",
        "promotion.alpha": "0.05",
        "promotion.metric": "test_bleu",
        "promotion.challenger_score": "30.500000",
        "promotion.champion_score": "28.000000",
        "promotion.p_value": "0.012000",
        "promotion.challenger_ci": "[29.6000, 31.4000]",
        "promotion.champion_ci": "[27.1000, 28.9000]",
    }
    first = promotion_tags(None, True, "no champion yet", champion_version=None, alpha=0.05)
    assert first["promotion.champion_version"] == "None"
    assert "promotion.p_value" not in first


def test_decision_summary_is_one_log_line():
    assert decision_summary("3", "kn", False, "not better (p=0.5000)") == (
        "version 3 (kn): not promoted (not better (p=0.5000))"
    )


def test_compare_with_champion_pairs_two_outputs_records():
    experiment = ExperimentConfig.model_validate(
        {
            "task": "language_model",
            "corpus": {"kind": "monolingual", "files": [{"url": "https://h/t.txt"}]},
            "models": {"kn": {"type": "ngram", "architecture": {"order": 3}}},
        }
    )
    nll = np.random.default_rng(0).gamma(4.0, 5.0, size=300)
    chars = [40] * len(nll)
    challenger = {"line_nll": (nll * 0.8).tolist(), "line_chars": chars}
    champion = {"line_nll": nll.tolist(), "line_chars": chars}
    c = compare_with_champion(challenger, champion, experiment)
    assert c.metric == "test_bits_per_char" and c.challenger < c.champion
    assert decide(c, experiment.higher_is_better, alpha=0.05)[0] is True
    assert (CHAMPION, CHALLENGER) == ("champion", "challenger")


# --- comparison report ----------------------------------------------------------------------


def _records() -> list[dict]:
    """Three registered versions as tasks/compare.py reads them from the registry."""
    return [
        {  # the newest: an n-gram model with no test metrics and no loss curves
            "version": "3",
            "run_id": "run-3",
            "run_name": "kn-run",
            "aliases": [CHALLENGER],
        },
        {
            "version": "1",
            "run_id": "run-1",
            "run_name": "transformer-run",
            "version_tags": {
                "model_name": "transformer",
                "promotion.metric": "test_bleu",
                "corpus_version": "5414cbb372c68d00",
            },
            "run_tags": {"model_type": "transformer"},
            "aliases": [CHAMPION],
            "metrics": {
                "test_bleu": 32.0,
                "test_bleu_ci_low": 31.0,
                "test_bleu_ci_high": 33.0,
                "test_chrf": 57.5,
                "n_parameters": 9_500_000,
                "train_time_s": 1234.5,
                "tokens_per_s": 15000.0,
            },
            "history": {"train_loss": [(200, 2.5), (100, 4.0)], "valid_loss": [(200, 2.9)]},
        },
        {
            "version": "2",
            "run_id": "run-2",
            "run_name": "lstm-run",
            "version_tags": {"model_name": "lstm", "model_type": "lstm"},
            "metrics": {"test_bleu": 30.25, "test_chrf": 55.0, "n_parameters": 800},
            "history": {"train_loss": [(100, 4.5), (200, 3.1)], "valid_loss": []},
        },
    ]


def test_records_become_rows_in_version_order():
    comparison = build_comparison("mt-de-en", _records())
    assert comparison["primary_metric"] == "test_bleu"  # the metric promotion decided by
    assert comparison["higher_is_better"] is True
    rows = comparison["rows"]
    assert [r["version"] for r in rows] == ["1", "2", "3"]
    transformer, lstm, kn = rows
    assert transformer["model"] == "transformer" and transformer["model_type"] == "transformer"
    assert transformer["primary"] == 32.0 and transformer["ci"] == (31.0, 33.0)
    assert transformer["metrics"] == {"test_chrf": 57.5}  # the primary metric is not repeated
    assert transformer["history"]["train_loss"] == [(100, 4.0), (200, 2.5)]  # sorted by step
    assert lstm["ci"] is None and "valid_loss" not in lstm["history"]
    assert kn["model"] == "kn-run"  # no model_name tag: the run's name
    assert kn["primary"] is None and kn["history"] == {}


def test_an_exported_version_is_labelled_as_the_export_of_its_parent():
    export = {
        "version": "4",
        "run_name": "mt-de-en-v1-ctranslate2-int8",
        "version_tags": {
            "model_name": "transformer", "model_type": "transformer", "format": "ctranslate2",
            "quantization": "int8", "parent_version": "1",
        },
    }  # fmt: skip

    row = build_comparison("mt-de-en", [*_records(), export])["rows"][-1]

    assert row["model"] == "transformer (ctranslate2 int8 of v1)"
    assert row["model_type"] == "transformer" and row["primary"] is None


def test_a_language_model_comparison_finds_its_metric_from_the_metrics_logged():
    records = [{"version": "1", "metrics": {"test_bits_per_char": 2.1, "test_ppl_per_word": 90}}]
    comparison = build_comparison("lm", records)
    assert comparison["primary_metric"] == "test_bits_per_char"
    assert comparison["higher_is_better"] is False
    assert build_comparison("lm", records, primary_metric="test_ppl_per_word")["rows"][0][
        "primary"
    ] == pytest.approx(90)


def test_numbers_are_formatted_for_a_table():
    assert [fmt(None), fmt(float("nan")), fmt(0.123456), fmt(32.0), fmt(15000.0)] == [
        "-",
        "-",
        "0.1235",
        "32.00",
        "15,000",
    ]
    assert [fmt_count(None), fmt_count(800), fmt_count(9_500_000)] == ["-", "800", "9.50M"]


def test_the_table_shows_missing_values_as_dashes():
    header, cells = table_columns(build_comparison("mt-de-en", _records()))
    assert header == [
        "version",
        "model",
        "type",
        "corpus version",
        "test_bleu",
        "95% CI",
        "test_chrf",
        "parameters",
        "train time (s)",
        "tokens/s",
        "aliases",
    ]
    assert cells[0] == [
        "1",
        "transformer",
        "transformer",
        "5414cbb372c68d00",
        "32.00",
        "[31.00, 33.00]",
        "57.50",
        "9.50M",
        "1,234.5",
        "15,000",
        "champion",
    ]
    assert cells[2] == ["3", "kn-run", "", "-", "-", "-", "-", "-", "-", "-", "challenger"]


def test_the_markdown_report_names_the_champion_and_the_plots():
    comparison = build_comparison("mt-de-en", _records())
    plots = {"Learning curves": "learning_curves.png"}
    report = report_markdown(comparison, plots, "sqlite:///runs/mlflow.db")
    assert report.startswith("# mt-de-en: registered versions\n")
    assert "the champion is version 1 (transformer)." in report
    assert "Primary metric: `test_bleu` (higher is better)" in report
    # Text columns align left, numbers (versions included) right.
    assert "\n|--:|:--|:--|:--|--:|--:|--:|--:|--:|--:|:--|\n" in report
    assert "| 3 | kn-run |  | - | - | - | - | - | - | - | challenger |" in report
    assert "| 1 | transformer | transformer | 5414cbb372c68d00 | 32.00 |" in report
    assert "![Learning curves](learning_curves.png)" in report
    assert "No train/valid loss history (not trained by steps): v3 kn-run." in report


def test_without_a_champion_the_report_says_so():
    records = [{**r, "aliases": []} for r in _records()]
    report = report_markdown(build_comparison("mt-de-en", records), {}, "sqlite:///x.db")
    assert "the champion is unset." in report


def test_write_report_draws_the_plots_and_writes_the_markdown(tmp_path):
    files = write_report(build_comparison("mt-de-en", _records()), tmp_path / "report", "file:x")
    assert set(files) == {
        "report",
        "learning_curves.png",
        "primary_metric.png",
        "test_metrics.png",
    }
    for name in ("learning_curves.png", "primary_metric.png", "test_metrics.png"):
        assert files[name] == tmp_path / "report" / name
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "report" / "comparison.md").read_text(encoding="utf-8")
    assert files["report"] == tmp_path / "report" / "comparison.md"
    assert "![Primary metric: test_bleu](primary_metric.png)" in markdown
    assert "![Other test metrics](test_metrics.png)" in markdown


def test_write_report_skips_plots_with_nothing_to_draw(tmp_path):
    files = write_report(build_comparison("lm", [{"version": "1"}]), tmp_path, "file:x")
    assert set(files) == {"report"}
    assert "| 1 |" in files["report"].read_text(encoding="utf-8")


def test_versions_trained_on_new_data_are_plotted_by_corpus_version(tmp_path):
    # A scheduled run learns from new data: v1 on corpus version A, v2 and v3 on version B.
    def version(number: str, model: str, corpus: str, bleu: float, aliases=()):
        tags = {"model_name": model, "corpus_version": corpus, "promotion.metric": "test_bleu"}
        metrics = {"test_bleu": bleu, "test_bleu_ci_low": bleu - 1, "test_bleu_ci_high": bleu + 1}
        return {"version": number, "version_tags": tags, "metrics": metrics, "aliases": aliases}

    records = [
        version("1", "transformer", "aaaa1111aaaa1111", 30.0),
        version("2", "transformer", "bbbb2222bbbb2222", 31.5, aliases=[CHAMPION]),
        version("3", "lstm", "bbbb2222bbbb2222", 29.0),
    ]
    comparison = build_comparison("mt-de-en", records)
    assert [r["corpus_version"] for r in comparison["rows"]] == [
        "aaaa1111aaaa1111",
        "bbbb2222bbbb2222",
        "bbbb2222bbbb2222",
    ]
    files = write_report(comparison, tmp_path, "file:x")
    assert files["corpus_versions.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = files["report"].read_text(encoding="utf-8")
    assert "![test_bleu by corpus version](corpus_versions.png)" in markdown
    assert "| 2 | transformer |" in markdown and "bbbb2222bbbb2222" in markdown


def test_one_corpus_version_draws_no_corpus_version_plot(tmp_path):
    # _records(): one version has a corpus version, the others none: nothing to compare.
    files = write_report(build_comparison("mt-de-en", _records()), tmp_path, "file:x")
    assert "corpus_versions.png" not in files
