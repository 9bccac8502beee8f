"""A pretrained Hugging Face causal LM (a tiny random GPT-2 made here, no hub) fine-tuned
through the seqmodels trainer, scored with its own byte-level BPE tokenizer, and loaded back
from its model folder alone."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra is not installed")

from seqmodels.config import ConfigError, VocabConfig, load_config, parse_model_spec  # noqa: E402
from seqmodels.data.vocab import train_sentencepiece  # noqa: E402
from seqmodels.evaluation.metrics import language_model_metrics  # noqa: E402
from seqmodels.models.folder import load_predictor, train_model  # noqa: E402
from seqmodels.models.huggingface import LoraSettings  # noqa: E402
from seqmodels.training.checkpoint import list_checkpoints  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.model_helpers import make_tiny_gpt2  # noqa: E402

WORDS = "the cat sat on a mat and the dog ran in the park with a red ball!".split()


@pytest.fixture(autouse=True)
def offline(monkeypatch, single_thread_torch):
    """No test here may reach the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A cleaned-schema Parquet, a SentencePiece model (train_model copies it; this family does
    not use it) and the lines."""
    folder = tmp_path_factory.mktemp("hf_corpus")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(4, 9))) for _ in range(240)]
    splits = ["train"] * 200 + ["valid"] * 20 + ["test"] * 20
    parquet = folder / "lm.parquet"
    ids = list(range(len(lines)))
    pq.write_table(pa.table({"id": ids, "split": splits, "text": lines}), parquet)
    spm_model = train_sentencepiece(parquet, ["text"], folder / "spm", VocabConfig(vocab_size=60))
    return parquet, spm_model, lines


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, corpus) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), corpus[2])


def spec(pretrained: Path | str, **training):
    settings = {"max_steps": 30, "batch_tokens": 256, "block_size": 32, "lr": 3e-3}
    settings |= {"warmup_steps": 3, "eval_every": 10, "log_every": 1, **training}
    return parse_model_spec(
        {
            "type": "hf_causal_lm",
            "architecture": {"pretrained": str(pretrained)},
            "training": settings,
        }
    )


def fine_tune(tiny_gpt2: Path, corpus, out_dir: Path, **training) -> tuple[dict, list[float]]:
    parquet, spm_model, _ = corpus
    losses: list[float] = []

    def on_metrics(metrics: dict, step: int) -> None:
        if "train_loss" in metrics:
            losses.append(metrics["train_loss"])

    summary = train_model(
        spec(tiny_gpt2, **training), "language_model", parquet, spm_model, out_dir,
        on_metrics=on_metrics,
    )  # fmt: skip
    return summary, losses


def test_fine_tuning_lowers_the_loss_and_the_folder_loads_without_the_checkpoint(
    tiny_gpt2, corpus, tmp_path
):
    # The checkpoint is copied so it can be removed: the folder must not need it any more.
    checkpoint = shutil.copytree(tiny_gpt2, tmp_path / "checkpoint")
    summary, losses = fine_tune(checkpoint, corpus, tmp_path / "model")
    assert summary["steps"] == 30 and len(losses) >= 20
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    shutil.rmtree(checkpoint)

    predictor = load_predictor(tmp_path / "model", device="cpu")
    from transformers import AutoTokenizer

    gpt2_vocab = len(AutoTokenizer.from_pretrained(str(tmp_path / "model" / "hf")))
    assert predictor.sp.vocab_size() == summary["vocab_size"] == gpt2_vocab != 60
    test_lines = corpus[2][-20:]
    nll = predictor.line_nll(test_lines)
    assert nll.shape == (20,) and np.isfinite(nll).all()
    metrics = language_model_metrics(*predictor.total_nll(test_lines), test_lines)
    assert 0 < metrics["test_bits_per_char"] < 8  # random bytes would be 8
    assert math.isfinite(metrics["test_ppl_per_word"])
    assert metrics["test_nll_nats"] == pytest.approx(nll.sum())
    text = predictor.generate(["the cat"], max_new_tokens=12, seed=0)
    assert isinstance(text[0], str) and text[0]


def test_the_end_of_line_is_the_tokenizers_eos_and_special_tokens_are_never_sampled(
    tiny_gpt2, corpus, tmp_path
):
    fine_tune(tiny_gpt2, corpus, tmp_path / "model", max_steps=2)
    predictor = load_predictor(tmp_path / "model", device="cpu")
    eos = predictor.sp.eos_id()
    assert eos == predictor.eos_id and predictor.stream_ids(["the cat"])[0] == eos
    assert predictor.stream_ids(["the cat"])[-1] == eos
    assert eos not in predictor.banned  # it ends lines: sampled as a newline
    # Id 0 is a real byte here (SentencePiece's pad): generating must be able to use it.
    assert 0 not in predictor.banned


def test_an_unknown_hub_id_offline_is_a_clear_error_before_any_stage(tmp_path):
    name = "nobody/no-such-model-xyz"
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        "experiments:\n  lm:\n    task: language_model\n"
        "    corpus: {kind: monolingual, files: [{url: 'https://example.org/a.txt'}]}\n"
        f"    models:\n      gpt: {{type: hf_causal_lm, architecture: {{pretrained: {name}}}}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    message = str(caught.value)
    assert name in message and "HF_HUB_OFFLINE" in message and "local folder" in message


def test_an_unknown_hub_id_offline_fails_when_training_directly(corpus, tmp_path):
    parquet, spm_model, _ = corpus
    with pytest.raises(ValueError, match="no-such-model-xyz.*save_pretrained"):
        train_model(
            spec("nobody/no-such-model-xyz"), "language_model", parquet, spm_model, tmp_path
        )


class Interrupted(Exception):
    pass


def test_an_interrupted_fine_tuning_resumes_to_the_same_weights(tiny_gpt2, corpus, tmp_path):
    settings = {"max_steps": 20, "checkpoint_every": 5, "eval_every": 100, "keep_last": 5}
    fine_tune(tiny_gpt2, corpus, tmp_path / "whole", **settings)

    def stop_at_12(metrics: dict, step: int) -> None:
        if step >= 12:
            raise Interrupted  # as if killed after the step-10 checkpoint

    parquet, spm_model, _ = corpus
    with pytest.raises(Interrupted):
        train_model(
            spec(tiny_gpt2, **settings), "language_model", parquet, spm_model,
            tmp_path / "interrupted", on_metrics=stop_at_12,
        )  # fmt: skip
    assert list_checkpoints(tmp_path / "interrupted" / "checkpoints")[-1][0] == 10
    summary, _ = fine_tune(tiny_gpt2, corpus, tmp_path / "interrupted", **settings)
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 20
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "interrupted" / "model.pt", weights_only=True)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_missing_transformers_is_a_clear_error_and_the_registry_still_imports():
    # sys.modules[name] = None makes `import name` fail as if it were not installed.
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import seqmodels.models, seqmodels.config\n"
        "try:\n"
        "    seqmodels.config.parse_model_spec("
        "{'type': 'hf_causal_lm', 'architecture': {'pretrained': 'gpt2'}})\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert "pip install 'seqmodels[hf]'" in out.stdout


def test_lora_without_peft_installed_is_a_clear_error():
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "import seqmodels.config\n"
        "try:\n"
        "    seqmodels.config.parse_model_spec({'type': 'hf_causal_lm', "
        "'architecture': {'pretrained': 'gpt2', 'lora': {'r': 4}}})\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert "LoRA fine-tuning needs peft" in out.stdout and "seqmodels[hf]" in out.stdout


def test_lora_trains_only_the_adapters_and_exports_them_merged(tiny_gpt2, corpus, tmp_path):
    pytest.importorskip("peft", reason="peft is not installed")
    from seqmodels.models.folder import transformers_export

    parquet, spm_model, lines = corpus
    lora_spec = spec(tiny_gpt2, max_steps=20, lr=1e-2)
    lora_spec.architecture.lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    losses: list[float] = []
    summary = train_model(
        lora_spec, "language_model", parquet, spm_model, tmp_path / "model",
        on_metrics=lambda m, step: losses.extend([m["train_loss"]] if "train_loss" in m else []),
    )  # fmt: skip
    assert summary["steps"] == 20 and np.mean(losses[-5:]) < np.mean(losses[:5])
    # Only the adapters moved: every weight of the checkpoint is as it was.
    from safetensors.torch import load_file

    original = load_file(tiny_gpt2 / "model.safetensors")
    trained = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    adapters = [k for k in trained if "lora_" in k]
    assert adapters and all("lora_B" not in k or trained[k].abs().sum() > 0 for k in adapters)
    for key, value in original.items():
        module, name = key.rsplit(".", 1)  # an adapted layer keeps its weight in base_layer
        ends = (f".{key}", f".{module}.base_layer.{name}")
        found = [k for k in trained if k.endswith(ends)]
        assert len(found) == 1 and torch.equal(trained[found[0]], value), key
    # The exported pipeline has the adapters merged and computes what the LoRA model does.
    predictor = load_predictor(tmp_path / "model", device="cpu")
    _, pipeline, meta = transformers_export(tmp_path / "model")
    assert meta["architecture"]["lora"]["r"] == 4
    assert not any("lora_" in name for name, _ in pipeline.model.named_parameters())
    ids = torch.tensor([predictor.stream_ids(lines[:2])])
    with torch.no_grad():
        lora_logits, _ = predictor.model(ids)
        merged_logits = pipeline.model(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, lora_logits, rtol=1e-4, atol=1e-4)
