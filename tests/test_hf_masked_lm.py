"""A pretrained Hugging Face masked LM (a tiny random BERT made here, no hub) fine-tuned with
BERT's dynamic masking through the seqmodels trainer, and scored by pseudo-log-likelihood
under metric names of its own."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra is not installed")

from seqmodels.config import (  # noqa: E402
    CorpusConfig,
    EvaluationConfig,
    ExperimentConfig,
    SourceFile,
    parse_model_spec,
)
from seqmodels.evaluation.comparison import PLL_NOTE, report_markdown  # noqa: E402
from seqmodels.evaluation.scoring import evaluate_predictor  # noqa: E402
from seqmodels.models import get_family  # noqa: E402
from seqmodels.models.folder import load_predictor, train_model  # noqa: E402
from seqmodels.models.huggingface import HFTokenizer  # noqa: E402
from seqmodels.training.batching import (  # noqa: E402
    IGNORE_TARGET,
    LMBatches,
    MaskedLMBatches,
    mask_tokens,
)
from tests.hf_checkpoints import make_tiny_bert  # noqa: E402

WORDS = "the cat sat on a mat and the dog ran in the park with a red ball".split()


@pytest.fixture(autouse=True)
def offline(monkeypatch, single_thread_torch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("mlm_corpus")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(4, 9))) for _ in range(240)]
    splits = ["train"] * 200 + ["valid"] * 20 + ["test"] * 20
    parquet = folder / "lm.parquet"
    pq.write_table(pa.table({"id": list(range(240)), "split": splits, "text": lines}), parquet)
    return parquet, lines


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, corpus) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), corpus[1])


def spec(pretrained: Path, **training):
    settings = {"max_steps": 40, "batch_tokens": 512, "block_size": 32, "lr": 3e-3}
    settings |= {"warmup_steps": 3, "eval_every": 20, "log_every": 1, **training}
    return parse_model_spec(
        {
            "type": "hf_masked_lm",
            "architecture": {"pretrained": str(pretrained)},
            "training": settings,
        }
    )


def masking_of(tiny_bert: Path, probability: float = 0.15, seed: int = 0):
    tok = HFTokenizer.load(tiny_bert)
    training = spec(tiny_bert, mask_probability=probability, seed=seed).training
    return get_family("hf_masked_lm").masking(training, tok), tok


def test_masking_follows_bert_80_10_10_and_never_selects_special_tokens(tiny_bert):
    masking, tok = masking_of(tiny_bert)
    specials = torch.tensor(tok.tokenizer.all_special_ids)
    x = torch.randint(5, tok.vocab_size(), (200, 64))
    x[:, 0], x[:, -1] = tok.tokenizer.cls_token_id, tok.tokenizer.sep_token_id
    corrupted, labels = mask_tokens(x, torch.ones_like(x, dtype=torch.bool), masking, 0)
    selected = labels != IGNORE_TARGET
    assert 0.14 < selected.float().mean() * 64 / 62 < 0.16  # 62 ordinary positions a row
    assert not torch.isin(x[selected], specials).any()  # cls/sep never selected
    assert torch.equal(labels[selected], x[selected])
    assert torch.equal(corrupted[~selected], x[~selected])  # the rest untouched
    masked = (corrupted[selected] == masking.mask_id).float().mean()
    unchanged = (corrupted[selected] == x[selected]).float().mean()
    assert 0.77 < masked < 0.83 and 0.08 < unchanged < 0.12  # random: the other ~10%


def test_masking_is_the_same_for_the_same_batch_and_new_for_the_next(tiny_bert):
    masking, tok = masking_of(tiny_bert)
    ids = np.random.default_rng(0).integers(5, tok.vocab_size(), 5000)
    first = MaskedLMBatches(LMBatches(ids, 32, 8, seed=1), masking)
    (a, la), _ = next(first)
    (b, lb), _ = next(first)
    assert not torch.equal(la, lb)
    state = first.state_dict()
    again = MaskedLMBatches(LMBatches(ids, 32, 8, seed=1), masking)
    next(again), next(again)
    (c, lc), _ = next(again)
    again.load_state_dict(state)  # resume: the same next batch, masked the same way
    (d, ld), _ = next(again)
    assert torch.equal(c, d) and torch.equal(lc, ld)


def test_fine_tuning_lowers_the_masked_loss(tiny_bert, corpus, tmp_path):
    losses: list[float] = []
    summary = train_model(
        spec(tiny_bert), "language_model", corpus[0], None, tmp_path / "model",
        on_metrics=lambda m, step: losses.extend([m["train_loss"]] if "train_loss" in m else []),
    )  # fmt: skip
    assert summary["steps"] == 40 and math.isfinite(summary["best_valid_loss"])
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_pseudo_log_likelihood_masks_each_token_in_turn(tiny_bert, corpus, tmp_path):
    train_model(spec(tiny_bert, max_steps=2), "language_model", corpus[0], None, tmp_path)
    predictor = load_predictor(tmp_path, device="cpu")
    line = "the cat sat on a mat"
    hf = predictor.sp.tokenizer
    ids = hf(line)["input_ids"]  # [CLS] ... [SEP]
    expected = 0.0
    with torch.no_grad():
        for i in range(1, len(ids) - 1):  # by hand: one forward pass per token
            masked = torch.tensor([ids[:i] + [hf.mask_token_id] + ids[i + 1 :]])
            logp = torch.log_softmax(predictor.model.hf(input_ids=masked).logits[0, i], -1)
            expected -= float(logp[ids[i]])
    assert predictor.line_nll([line])[0] == pytest.approx(expected, rel=1e-5)
    assert predictor.n_predicted([line]) == len(ids) - 2
    with pytest.raises(ValueError, match="does not generate"):
        predictor.generate(["the cat"])


def test_evaluation_reports_pll_metrics_under_their_own_names(tiny_bert, corpus, tmp_path):
    train_model(spec(tiny_bert, max_steps=2), "language_model", corpus[0], None, tmp_path)
    experiment = ExperimentConfig(
        task="language_model",
        corpus=CorpusConfig(kind="monolingual", files=[SourceFile(url="file:///x.txt")]),
        models={"bert": spec(tiny_bert)},
        evaluation=EvaluationConfig(bootstrap_samples=100),
    )
    assert experiment.primary_metric == "test_pll_bits_per_char"
    result = evaluate_predictor(load_predictor(tmp_path, device="cpu"), corpus[0], experiment)
    assert "test_bits_per_char" not in result.metrics and not result.outputs
    low, value, high = (
        result.metrics[f"test_pll_bits_per_char{s}"] for s in ("_ci_low", "", "_ci_high")
    )
    assert 0 < low <= value <= high and math.isfinite(result.metrics["test_pll_ppl_per_word"])


def test_masked_and_causal_models_are_not_ranked_together(tiny_bert):
    causal = parse_model_spec({"type": "transformer_lm", "architecture": {"n_layer": 1}})
    with pytest.raises(ValueError, match="pseudo-log-likelihood .* not comparable"):
        ExperimentConfig(
            task="language_model",
            corpus=CorpusConfig(kind="monolingual", files=[SourceFile(url="file:///x.txt")]),
            models={"bert": spec(tiny_bert), "gpt": causal},
        )
    comparison = {
        "name": "mlm",
        "primary_metric": "test_pll_bits_per_char",
        "higher_is_better": False,
        "rows": [
            {
                "version": "1", "model": "bert", "model_type": "hf_masked_lm",
                "primary": 3.2, "ci": None, "metrics": {"test_pll_ppl_per_word": 9.0},
                "cis": {}, "n_parameters": 1, "train_time_s": 1.0, "tokens_per_s": 1.0,
                "aliases": [], "history": {},
            }
        ],
    }  # fmt: skip
    assert PLL_NOTE in report_markdown(comparison, {}, "sqlite:///x.db")
