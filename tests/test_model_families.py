"""Model families: typed settings from the config, every registered family trained and loaded
back through the same code, and model folders written before the registry still loading."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seqmodels.config import ConfigError, VocabConfig, load_config, parse_model_spec
from seqmodels.data.splits import read_split
from seqmodels.data.vocab import train_sentencepiece
from seqmodels.models import FAMILIES, LANGUAGE_MODEL
from seqmodels.models.folder import META_FILE, load_predictor, train_model
from tests.conftest import REPO
from tests.hf_checkpoints import make_tiny_bert, make_tiny_marian
from tests.model_helpers import make_tiny_gpt2

LEGACY = REPO / "tests" / "fixtures" / "legacy_models"

CONFIG = """
experiments:
  lm:
    task: language_model
    corpus: {kind: monolingual, files: [{url: "https://example.org/a.txt"}]}
    models:
      small:
        type: transformer_lm
        architecture: {n_layer: 1, n_head: 2, d_model: 32, d_ff: 64, block_size: 16}
        training: %s
"""


def write_config(tmp_path: Path, training: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(CONFIG % training)
    return path


def test_yaml_numbers_written_as_strings_are_read_as_the_numbers_meant(tmp_path):
    # PyYAML reads 3e-3 (no dot) as the string "3e-3".
    config = load_config(write_config(tmp_path, "{lr: 3e-3, max_steps: '100', adam_eps: 1e-9}"))
    training = config.experiments["lm"].models["small"].training
    assert training.lr == pytest.approx(0.003) and isinstance(training.lr, float)
    assert training.max_steps == 100 and training.adam_eps == pytest.approx(1e-9)


def test_adam_settings_are_configurable_and_checked(tmp_path):
    config = load_config(write_config(tmp_path, "{adam_betas: [0.9, 0.95], weight_decay: 0.1}"))
    training = config.experiments["lm"].models["small"].training
    assert tuple(training.adam_betas) == (0.9, 0.95) and training.weight_decay == 0.1
    with pytest.raises(ConfigError, match=r"adam_betas must be in \[0, 1\)"):
        load_config(write_config(tmp_path, "{adam_betas: [0.9, 1.5]}"))


def test_a_value_of_the_wrong_type_names_the_file_the_model_and_the_field(tmp_path):
    path = write_config(tmp_path, "{lr: fast}")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "experiments.lm.models.small (transformer_lm).training.lr" in message
    assert "valid number" in message


def test_settings_that_do_not_apply_to_a_family_are_refused(tmp_path):
    # Label smoothing is a sequence-to-sequence setting; a language model trains on the NLL.
    with pytest.raises(ConfigError, match=r"training.label_smoothing: Extra inputs"):
        load_config(write_config(tmp_path, "{label_smoothing: 0.1}"))
    with pytest.raises(ValueError, match="n_head"):
        parse_model_spec({"type": "transformer_lm", "architecture": {"d_model": 30, "n_head": 4}})
    with pytest.raises(ValueError, match="Extra inputs"):
        parse_model_spec({"type": "ngram", "training": {"max_steps": 10}})


# --- every registered family, the same way ---------------------------------------------------

WORDS = "the cat sat on a mat and the dog ran in the park with a red ball".split()


@pytest.fixture(scope="module")
def tiny_corpora(tmp_path_factory):
    """A monolingual and a parallel Parquet in the cleaned schema, and their vocabularies."""
    folder = tmp_path_factory.mktemp("corpora")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(4, 9))) for _ in range(300)]
    splits = ["train"] * 260 + ["valid"] * 20 + ["test"] * 20
    ids = list(range(len(lines)))
    lm = folder / "lm.parquet"
    pq.write_table(pa.table({"id": ids, "split": splits, "text": lines}), lm)
    mt = folder / "mt.parquet"
    upper = [line.upper() for line in lines]  # a "translation" the models can learn
    pq.write_table(pa.table({"id": ids, "split": splits, "src": lines, "tgt": upper}), mt)
    vocab = VocabConfig(vocab_size=60)
    return {
        "language_model": (lm, train_sentencepiece(lm, ["text"], folder / "v1", vocab)),
        "translation": (mt, train_sentencepiece(mt, ["src", "tgt"], folder / "v2", vocab)),
    }


@pytest.fixture(scope="module")
def tiny_pretrained(tiny_corpora, tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints (save_pretrained layout) for the families that fine-tune one."""
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    lines = read_split(tiny_corpora["language_model"][0], "train", ["text"])["text"]
    pairs = read_split(tiny_corpora["translation"][0], "train", ["src", "tgt"])
    return {
        "hf_causal_lm": make_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), lines),
        "hf_masked_lm": make_tiny_bert(tmp_path_factory.mktemp("bert"), lines),
        "hf_seq2seq": make_tiny_marian(
            tmp_path_factory.mktemp("marian"), pairs["src"] + pairs["tgt"]
        ),
    }


SMALL = {
    "ngram": {"order": 3},
    "lstm_lm": {"emb_dim": 16, "hidden_size": 16, "n_layers": 1},
    "gru_lm": {"emb_dim": 16, "hidden_size": 16, "n_layers": 1},
    "transformer_lm": {"n_layer": 1, "n_head": 2, "d_model": 16, "d_ff": 32, "block_size": 16},
    "lstm_seq2seq": {"emb_dim": 16, "enc_hidden": 16, "dec_hidden": 32},
    "transformer_seq2seq": {"d_model": 16, "n_head": 2, "n_enc_layers": 1, "n_dec_layers": 1},
}


def small_spec(model_type: str, arch: dict | None = None):
    family = FAMILIES[model_type]
    arch = arch or SMALL.get(model_type, {})  # a new family trains at its default size
    training = {}
    if "max_steps" in family.Training.model_fields:
        training = {"max_steps": 6, "batch_tokens": 256, "eval_every": 3, "warmup_steps": 2}
    return parse_model_spec({"type": model_type, "architecture": arch, "training": training})


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_trains_writes_a_folder_and_loads_back(
    model_type, tiny_corpora, tmp_path, request
):
    task = "language_model" if FAMILIES[model_type].task == LANGUAGE_MODEL else "translation"
    parquet, spm = tiny_corpora[task]
    arch = None
    if "pretrained" in FAMILIES[model_type].Architecture.model_fields:
        # A family that fine-tunes a checkpoint starts from a tiny one made here.
        arch = {"pretrained": str(request.getfixturevalue("tiny_pretrained")[model_type])}
    spec = small_spec(model_type, arch)
    summary = train_model(spec, task, parquet, spm, tmp_path, decoding={"beam_size": 2})
    assert summary["vocab_size"] > 0 and summary["train_time_s"] > 0
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["type"] == model_type and meta["format"] == 2
    predictor = load_predictor(tmp_path, device="cpu")
    if task == "language_model":
        nll = predictor.line_nll(["the cat sat", "a dog ran in the park"])
        assert len(nll) == 2 and all(math.isfinite(x) and x > 0 for x in nll)
        if predictor.can_generate:  # a masked LM scores text, it does not write it
            assert isinstance(predictor.generate(["the cat"], max_new_tokens=5, seed=0)[0], str)
    else:
        outputs = predictor.translate(["the cat sat on a mat", "the dog ran"])
        assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)


def test_a_folder_without_its_metadata_is_not_a_finished_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished seqmodels model"):
        load_predictor(tmp_path)


# --- folders written before the registry -----------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in LEGACY.iterdir() if p.is_dir()))
def test_model_folders_written_by_the_previous_code_still_load_and_agree(name, tmp_path):
    """tests/fixtures/legacy_models was made by commit a936924 (make_legacy_fixture.py); the
    outputs recorded then must come out of today's code unchanged."""
    expected = json.loads((LEGACY / "expected.json").read_text())[name]
    folder = shutil.copytree(LEGACY / name, tmp_path / name)  # never written into the fixture
    predictor = load_predictor(folder, device="cpu")
    if "translations" in expected:
        assert predictor.translate(expected["sources"]) == expected["translations"]
        return
    np.testing.assert_allclose(predictor.line_nll(expected["lines"]), expected["line_nll"], 1e-6)
    total, count = predictor.total_nll(expected["lines"])
    assert count == expected["total_nll"][1]
    assert total == pytest.approx(expected["total_nll"][0], rel=1e-6)
    assert predictor.generate(["ROMEO:"], max_new_tokens=12, seed=0) == expected["generate"]


def test_versions_registered_by_the_previous_code_still_load_through_the_registry(
    tmp_path, monkeypatch
):
    """A version logged as the previous code logged it (its own pyfunc file, which imports
    seqmodels.predictor, and a folder in the old layout) loads through models:/ in a
    process where today's seqmodels is already imported, as in the pipeline re-scoring an
    old champion or in `seqmodels translate`."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("legacy", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        mlflow.pyfunc.log_model(
            name="model",
            python_model=str(REPO / "tests" / "fixtures" / "legacy_pyfunc_model.py"),
            artifacts={"model_dir": str(LEGACY / "transformer_seq2seq")},
            pip_requirements=["torch", "sentencepiece"],
            registered_model_name="legacy-mt",
        )
    expected = json.loads((LEGACY / "expected.json").read_text())["transformer_seq2seq"]
    model = mlflow.pyfunc.load_model("models:/legacy-mt/1")
    assert model.predict(expected["sources"]) == expected["translations"]


# --- warm start (init_from) ------------------------------------------------------------------


def weights(folder: Path) -> dict:
    import torch

    return torch.load(folder / "model.pt", weights_only=True)


def lstm_spec(lr: float = 1e-2, **arch):
    return parse_model_spec(
        {
            "type": "lstm_lm",
            "architecture": {"emb_dim": 16, "hidden_size": 16, "n_layers": 1, **arch},
            "training": {"max_steps": 4, "batch_tokens": 256, "eval_every": 4, "lr": lr}
            | {"warmup_steps": 0, "weight_decay": 0.0},
        }
    )


def test_a_warm_start_begins_from_the_parent_weights(tiny_corpora, tmp_path):
    parquet, spm = tiny_corpora["language_model"]
    train_model(lstm_spec(), "language_model", parquet, spm, tmp_path / "parent")
    # With a vanishing learning rate the child ends where it started: at the parent's weights.
    tiny_lr = lstm_spec(lr=1e-12)
    train_model(
        tiny_lr,
        "language_model",
        parquet,
        spm,
        tmp_path / "child",
        decoding=None,
        init_from=tmp_path / "parent",
    )
    train_model(tiny_lr, "language_model", parquet, spm, tmp_path / "scratch")
    parent, child, scratch = (weights(tmp_path / n) for n in ("parent", "child", "scratch"))
    for key in parent:
        np.testing.assert_allclose(child[key].numpy(), parent[key].numpy(), atol=1e-6)
    assert any(not np.allclose(scratch[k].numpy(), parent[k].numpy()) for k in parent)


def test_a_warm_start_needs_the_same_architecture_and_vocabulary(tiny_corpora, tmp_path):
    parquet, spm = tiny_corpora["language_model"]
    train_model(lstm_spec(), "language_model", parquet, spm, tmp_path / "parent")
    wider = lstm_spec(emb_dim=32, hidden_size=32)
    with pytest.raises(
        ValueError,
        match=r"(?s)holds a lstm_lm model .*'hidden_size': 16.*"
        r"this model is a lstm_lm .*'hidden_size': 32",
    ):
        train_model(
            wider,
            "language_model",
            parquet,
            spm,
            tmp_path / "c1",
            decoding=None,
            init_from=tmp_path / "parent",
        )
    other_parquet, other_spm = tiny_corpora["translation"]  # another SentencePiece model
    with pytest.raises(ValueError, match="differs from this experiment's"):
        train_model(
            lstm_spec(),
            "language_model",
            parquet,
            other_spm,
            tmp_path / "c2",
            decoding=None,
            init_from=tmp_path / "parent",
        )
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()  # refused first


def test_init_from_is_refused_for_a_family_that_is_not_trained(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "experiments:\n  lm:\n    task: language_model\n"
        "    corpus: {kind: monolingual, files: [{url: 'https://example.org/a.txt'}]}\n"
        "    models: {kn: {type: ngram, init_from: 'models:/lm@champion'}}\n"
    )
    with pytest.raises(ConfigError, match="cannot start from another model's weights"):
        load_config(path)


def test_whole_numbers_written_in_e_notation_fill_integer_settings(tmp_path):
    config = load_config(write_config(tmp_path, "{max_steps: 1e4, batch_tokens: 16e3}"))
    training = config.experiments["lm"].models["small"].training
    assert training.max_steps == 10_000 and training.batch_tokens == 16_000
    with pytest.raises(ConfigError, match=r"training.max_steps: Input should be a valid integer"):
        load_config(write_config(tmp_path, "{max_steps: 1.5e1x}"))


def test_init_from_takes_a_bare_version_number(tmp_path):
    spec = parse_model_spec({"type": "lstm_lm", "init_from": 3})
    assert spec.init_from == "3"
