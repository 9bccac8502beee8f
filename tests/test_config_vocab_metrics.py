"""Config validation, the SentencePiece stage and the metric normalisations."""

from __future__ import annotations

import math

import pytest

from seqmodels import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from seqmodels.config import CleanConfig, ConfigError, VocabConfig, load_config
from seqmodels.data.clean import InputFile, clean_corpus
from seqmodels.data.vocab import train_sentencepiece
from seqmodels.evaluation.metrics import language_model_metrics, text_units, translation_metrics
from seqmodels.files import load_sentencepiece
from tests.conftest import REPO


def test_shipped_configs_are_valid_and_gpu_overrides_only_sizes():
    default = load_config(REPO / "configs/default.yaml")
    gpu = load_config(REPO / "configs/gpu.yaml")
    mt, mt_gpu = default.experiments["mt-multi30k-de-en"], gpu.experiments["mt-multi30k-de-en"]
    assert mt_gpu.models["transformer"].architecture.d_model == 512
    assert mt_gpu.corpus == mt.corpus  # inherited, not repeated
    # The CPU profile's wall-clock caps must not leak into the GPU profile through the merge.
    for exp in gpu.experiments.values():
        for spec in exp.models.values():
            assert getattr(spec.training, "max_train_minutes", None) is None
    assert mt.primary_metric == "test_bleu" and mt.higher_is_better
    assert default.experiments["lm-shakespeare"].primary_metric == "test_bits_per_char"


def _write_yaml(path, text):
    path.write_text(text)
    return path


MINIMAL = """
experiments:
  lm:
    task: language_model
    corpus: {kind: monolingual, files: [{url: "https://example.org/a.txt"}]}
    models:
      m: {type: %s, architecture: %s}
"""


def test_unknown_key_error_names_the_file_and_the_field(tmp_path):
    path = _write_yaml(
        tmp_path / "c.yaml", MINIMAL % ("ngram", "{order: 3}") + "    clean: {min_char: 3}\n"
    )
    with pytest.raises(
        ConfigError, match=r"(?s)c.yaml: invalid.*experiments.lm.clean.min_char: Extra inputs"
    ):
        load_config(path)


def test_unknown_architecture_key_and_wrong_model_type_are_refused(tmp_path):
    path = _write_yaml(tmp_path / "c.yaml", MINIMAL % ("transformer_lm", "{layers: 3}"))
    expected = r"experiments.lm.models.m \(transformer_lm\).architecture.layers: Extra inputs"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)
    path = _write_yaml(tmp_path / "d.yaml", MINIMAL % ("transformer_seq2seq", "{}"))
    with pytest.raises(ConfigError, match="not a language_model model"):
        load_config(path)


def test_mirror_env_comes_before_config_mirrors(tmp_path, monkeypatch):
    path = _write_yaml(tmp_path / "c.yaml", "mirrors: [/m2]\n" + MINIMAL % ("ngram", "{}"))
    monkeypatch.setenv("SEQMODELS_MIRROR", "/m1, http://host/m3")
    assert load_config(path).resolved_mirrors() == ["/m1", "http://host/m3", "/m2"]


def test_mlflow_tracking_uri_env_wins(tmp_path, monkeypatch):
    path = _write_yaml(tmp_path / "c.yaml", MINIMAL % ("ngram", "{}"))
    # mlflow.set_tracking_uri (tasks.tracking.mlflow_client) sets it for the whole session.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert load_config(path).resolved_tracking_uri().startswith("sqlite:////")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert load_config(path).resolved_tracking_uri() == "http://127.0.0.1:5000"


def test_sentencepiece_is_trained_on_train_rows_with_the_shared_special_ids(tmp_path):
    lines = [f"the cat number {i} sat on the mat" for i in range(300)] + ["zebra quagga okapi"] * 5
    path = tmp_path / "t.txt"
    path.write_text("\n".join(lines) + "\n")
    cfg = CleanConfig(valid_fraction=0.0, test_fraction=0.02)  # the zebra lines land in test
    parquet, _ = clean_corpus([InputFile(path, "u/t.txt")], tmp_path / "clean", cfg, "monolingual")
    model = train_sentencepiece(parquet, ["text"], tmp_path / "vocab", VocabConfig(vocab_size=60))
    sp = load_sentencepiece(model)
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert sp.decode(sp.encode("the cat sat")) == "the cat sat"
    assert "▁zebra" not in {sp.id_to_piece(i) for i in range(sp.vocab_size())}


def test_language_model_metrics_normalise_by_tokens_words_and_characters():
    lines = ["ab cd", "e"]  # words 2+1 (+2 line ends) = 5; chars 5+1 (+2) = 8
    assert text_units(lines) == (5, 8)
    nll = 8 * math.log(2) * 1.5  # 1.5 bits per character
    m = language_model_metrics(nll, n_tokens=4, lines=lines)
    assert m["test_bits_per_char"] == pytest.approx(1.5)
    assert m["test_ppl_per_word"] == pytest.approx(math.exp(nll / 5))
    assert m["test_ppl_per_token"] == pytest.approx(math.exp(nll / 4))


def test_translation_metrics_are_sacrebleu_with_signatures():
    refs = ["A man rides a bicycle.", "Two dogs play in the snow."]
    scores, signatures = translation_metrics(refs, refs)
    assert scores["test_bleu"] == pytest.approx(100.0) and scores["test_chrf"] == pytest.approx(
        100.0
    )
    assert signatures["bleu"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    worse, _ = translation_metrics(["A man.", "Dogs."], refs)
    assert worse["test_bleu"] < 50
    with pytest.raises(ValueError, match="1 hypotheses for 2 references"):
        translation_metrics(["x"], refs)


def test_unpinned_corpus_file_is_refused_when_checksums_are_required(tmp_path):
    path = _write_yaml(tmp_path / "c.yaml", "require_checksums: true\n" + MINIMAL % ("ngram", "{}"))
    with pytest.raises(ConfigError, match=r"https://example.org/a.txt has no sha256"):
        load_config(path)


def test_impossible_model_sizes_are_refused_before_anything_runs(tmp_path):
    arch = "{n_layer: 1, n_head: 3, d_model: 32, d_ff: 64, block_size: 16}"
    path = _write_yaml(tmp_path / "c.yaml", MINIMAL % ("transformer_lm", arch))
    with pytest.raises(ConfigError, match=r"experiments.lm"):
        load_config(path)


def test_translation_metrics_include_chrf_plus_plus_and_ter():
    refs = ["A man rides a bicycle.", "Two dogs play in the snow."]
    scores, signatures = translation_metrics(["A man rides a bike.", "Two dogs play."], refs)
    assert 0 < scores["test_chrf_pp"] < 100 and scores["test_ter"] > 0
    assert "nw:2" in signatures["chrf_pp"] and signatures["ter"].startswith("nrefs:1|case:lc")
    perfect, _ = translation_metrics(refs, refs)
    assert perfect["test_ter"] == pytest.approx(0.0)
