"""Summarisation end to end on a slice of the real AESLC archive (downloaded from the mirror
through the real download path): the real CLI, Prefect and MLflow. Every sequence-to-sequence
family trains on it, the lead baseline is scored beside them and never registered, the
champion is chosen by ROUGE-L, and `seqmodels summarize` / `compare` use the result."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("transformers", reason="the hf extra is not installed")
from mlflow import MlflowClient
from mlflow.models import Model

from tests.conftest import REPO
from tests.hf_checkpoints import make_tiny_marian
from tests.pipeline_cli import CLI, cli_env, run_checked

SHAKESPEARE = (
    "raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e"
    "/data/tinyshakespeare/input.txt"
)
TINY = {"max_steps": 20, "batch_tokens": 1024, "eval_every": 10, "warmup_steps": 5}


def _config(tmp_path: Path, mirror: Path) -> Path:
    """configs/summarization.yaml with the first 60 emails of each split, tiny models of the
    three sequence-to-sequence families trained from scratch and a tiny pretrained Marian."""
    truncate = {"max_source_tokens": 48}
    text = (mirror / SHAKESPEARE).read_text(encoding="utf-8").splitlines()[:3000]
    marian = make_tiny_marian(tmp_path / "marian", text, vocab_size=300)
    config = {
        "extends": str(REPO / "configs/summarization.yaml"),
        "work_dir": str(tmp_path / "runs"),
        "experiments": {
            "sum-aeslc": {
                "corpus": {"max_lines": 60},
                "vocab": {"vocab_size": 400},
                "models": {
                    "lstm_attention": {
                        "architecture": {"emb_dim": 32, "enc_hidden": 32, "dec_hidden": 64},
                        "training": TINY | truncate,
                    },
                    "transformer": {
                        "architecture": {
                            "d_model": 32,
                            "n_head": 2,
                            "n_enc_layers": 1,
                            "n_dec_layers": 1,
                            "d_ff": 64,
                        },
                        "training": TINY | truncate,
                    },
                    "conv": {
                        "type": "conv_seq2seq",
                        "architecture": {
                            "emb_dim": 32,
                            "hidden": 32,
                            "n_enc_layers": 1,
                            "n_dec_layers": 1,
                        },
                        "training": TINY | truncate,
                    },
                    "marian": {
                        "type": "hf_seq2seq",
                        "architecture": {"pretrained": str(marian)},
                        "training": TINY | truncate | {"lr": 3e-3},
                    },
                },
                "evaluation": {"beam_size": 2, "max_len_b": 8, "bootstrap_samples": 200},
            }
        },
    }
    path = tmp_path / "summarization.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.e2e
def test_summarisation_pipeline_trains_scores_promotes_and_summarises(
    tmp_path, mirror, monkeypatch
):
    db = tmp_path / "mlflow.db"
    env = cli_env(tmp_path, mirror)
    config = _config(tmp_path, mirror)
    out = run_checked([*CLI, "run", "--config", str(config)], tmp_path, env).stdout
    assert "seqmodels results" in out
    for name in ("lstm_attention", "transformer", "conv", "marian", "lead-6"):
        assert name in out

    client = MlflowClient(f"sqlite:///{db}")
    versions = client.search_model_versions("name = 'sum-aeslc'")
    # Four models registered; the lead baseline was scored but is not a version.
    names = sorted(v.tags["model_name"] for v in versions)
    assert names == ["conv", "lstm_attention", "marian", "transformer"]
    for version in versions:
        run = client.get_run(version.run_id)
        metrics, tags = run.data.metrics, run.data.tags
        for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            low, value, high = (metrics[f"test_{name}{s}"] for s in ("_ci_low", "", "_ci_high"))
            assert 0.0 <= low <= value <= high <= 100.0
        assert "test_rougeL_bestref" in metrics  # the @ann references of the test split
        assert metrics["test_examples"] == 60.0  # no test email dropped
        assert metrics["test_truncated_sources"] > 0  # cut at 48 pieces, and counted
        assert metrics["train_truncated_sources"] > 0
        assert "stem:yes" in tags["rouge_score.rouge.signature"]
        if version.tags["promotion.champion_version"] != "None":  # not the first version
            assert version.tags["promotion.metric"] == "test_rougeL"
            assert 0.0 <= float(version.tags["promotion.p_value"]) <= 1.0
    champion = client.get_model_version_by_alias("sum-aeslc", "champion")
    assert champion.tags["promotion.decision"] == "promoted"
    # The fine-tuned checkpoint is registered as a Hugging Face summarization pipeline.
    marian = next(v for v in versions if v.tags["model_name"] == "marian")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    flavor = Model.load(f"models:/sum-aeslc/{marian.version}").flavors["transformers"]
    assert flavor["task"] == "summarization"

    baseline = client.search_runs(
        [client.get_experiment_by_name("sum-aeslc").experiment_id], "tags.stage = 'baseline'"
    )
    assert [r.info.run_name for r in baseline] == ["lead-6"]
    assert baseline[0].data.metrics["test_rougeL"] > 0  # the first words share some words
    # Scored on the same corpus version as the models of this run.
    assert baseline[0].data.tags["corpus_version"] == versions[0].tags["corpus_version"]

    # A registered summariser, loaded in a fresh process through models:/.
    cli = [*CLI, "summarize", "--config", str(config)]
    emails = "Please review the attached contract before Friday.\n\nThe meeting is moved.\n"
    summaries = run_checked(cli, tmp_path, env, stdin=emails).stdout
    # One summary per input line on stdout (an untrained model's may be short); an empty
    # line stays empty.
    assert len(summaries.splitlines()) == 3 and summaries.splitlines()[1] == ""

    report = tmp_path / "report"
    cli = [*CLI, "compare", "sum-aeslc", "--out", str(report)]
    run_checked([*cli, "--config", str(config)], tmp_path, env)
    table = (report / "comparison.md").read_text()
    assert "test_rougeL" in table and "lead-6" in table and "baseline" in table
    assert (report / "primary_metric.png").exists()
