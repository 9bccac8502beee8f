"""Pretrained checkpoints through the whole pipeline (the real CLI, Prefect and MLflow): a
tiny GPT-2 fine-tuned beside the models trained from scratch on Tiny Shakespeare competes
for the champion alias by the same rule and is ranked with them by bits per character; an
experiment whose only model is a tiny Marian skips the SentencePiece stage."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

pytest.importorskip("transformers", reason="the hf extra is not installed")

from tests.conftest import REPO  # noqa: E402
from tests.hf_checkpoints import make_tiny_marian  # noqa: E402
from tests.model_helpers import make_tiny_gpt2  # noqa: E402
from tests.pipeline_cli import CLI, cli_env, run_checked  # noqa: E402

SHAKESPEARE = "raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e"
MULTI30K = "raw.githubusercontent.com/multi30k/dataset/a3d2e0d26b56f3846f66a952536ffed4e401d05a"
TRAINING = {"max_steps": 30, "batch_tokens": 512, "eval_every": 15, "warmup_steps": 5}


def _config(tmp_path: Path, mirror: Path) -> Path:
    """smoke.yaml plus a tiny GPT-2 in its LM experiment, and an MT experiment of its own
    with only a tiny Marian (the corpus of the default MT experiment, sliced)."""
    lines = (mirror / SHAKESPEARE / "data/tinyshakespeare/input.txt").read_text().splitlines()
    gpt2 = make_tiny_gpt2(tmp_path / "gpt2", lines[:4000])
    raw = mirror / MULTI30K / "data/task1/raw"
    pairs = []
    for lang in ("de", "en"):
        with gzip.open(raw / f"train.{lang}.gz", "rt", encoding="utf-8") as f:
            pairs += [next(f).strip() for _ in range(2000)]
    marian = make_tiny_marian(tmp_path / "marian", pairs, vocab_size=400)
    default = yaml.safe_load((REPO / "configs/default.yaml").read_text())
    mt_corpus = default["experiments"]["mt-multi30k-de-en"]["corpus"] | {"max_lines": 400}
    config = {
        "extends": str(REPO / "configs/smoke.yaml"),
        "experiments": {
            "lm-shakespeare": {
                "models": {
                    "gpt2": {
                        "type": "hf_causal_lm",
                        "architecture": {"pretrained": str(gpt2)},
                        "training": TRAINING | {"block_size": 32, "lr": 3e-3},
                    }
                }
            },
            "mt-hf": {
                "task": "translation",
                "corpus": mt_corpus,
                "models": {
                    "marian": {
                        "type": "hf_seq2seq",
                        "architecture": {"pretrained": str(marian)},
                        "training": TRAINING | {"lr": 3e-3},
                    }
                },
                "evaluation": {"beam_size": 2, "max_len_b": 5},
            },
        },
    }
    path = tmp_path / "pretrained.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.e2e
def test_pretrained_checkpoints_compete_with_models_trained_from_scratch(tmp_path, mirror):
    db = tmp_path / "mlflow.db"
    env = cli_env(tmp_path, mirror, HF_HUB_OFFLINE="1")
    config = _config(tmp_path, mirror)
    cli = [*CLI, "run", "--config", str(config)]
    result = run_checked([*cli, "-e", "lm-shakespeare", "-e", "mt-hf"], tmp_path, env)
    out = result.stdout + result.stderr
    assert "seqmodels results" in out and "gpt2" in out and "marian" in out
    # Only the LM experiment trained a SentencePiece model.
    assert "mt-hf: vocab" not in out and "lm-shakespeare: vocab" in out

    client = MlflowClient(f"sqlite:///{db}")
    lm = {v.tags["model_name"]: v for v in client.search_model_versions("name = 'lm-shakespeare'")}
    assert set(lm) == {"kn5", "lstm", "transformer", "rnn", "gpt2"}
    gpt2 = lm["gpt2"]
    assert gpt2.tags["pretrained"] == str(tmp_path / "gpt2")
    assert len(gpt2.tags["pretrained_weights_sha256"]) == 64
    assert "promotion.decision" in gpt2.tags  # judged by the same paired-bootstrap rule
    run = client.get_run(gpt2.run_id)
    assert {"test_bits_per_char", "test_ppl_per_word"} <= set(run.data.metrics)

    marian = client.get_model_version_by_alias("mt-hf", "champion")
    assert "vocab_sha256" not in marian.tags and marian.tags["model_type"] == "hf_seq2seq"
    assert "test_bleu" in client.get_run(marian.run_id).data.metrics

    # One table ranks GPT-2's byte-level BPE, the SentencePiece models and the n-gram model.
    report = tmp_path / "report"
    cli = [*CLI, "compare", "lm-shakespeare", "--out", str(report)]
    run_checked([*cli, "--config", str(config)], tmp_path, env)
    table = (report / "comparison.md").read_text()
    for model in ("gpt2", "transformer", "kn5"):
        assert model in table


def test_the_pretrained_profile_names_real_checkpoints_and_is_refused_offline(monkeypatch):
    from seqmodels.config import ConfigError, load_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online: hub ids resolve when training
    config = load_config(REPO / "configs/pretrained.yaml")
    mt = config.experiments["mt-multi30k-de-en"].models
    assert mt["t5_small"].architecture.source_prefix == "translate German to English: "
    assert config.experiments["lm-shakespeare"].models["gpt2"].type == "hf_causal_lm"
    # Offline with an empty cache: refused before any stage, naming the checkpoint.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="'gpt2' is not a local folder"):
        load_config(REPO / "configs/pretrained.yaml")
