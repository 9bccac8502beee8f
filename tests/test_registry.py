"""Registration and champion promotion against a real MLflow SQLite store."""

from __future__ import annotations

import mlflow
import pytest

from seqmodels.clean import InputFile, clean_corpus
from seqmodels.config import CleanConfig, ModelSpec, VocabConfig
from seqmodels.recipes import train_model
from seqmodels.vocab import train_sentencepiece
from tasks.registry import CHAMPION, beats, register_model_version
from tasks.tracking import experiment_id, mlflow_client


@pytest.fixture()
def tiny_ngram_dir(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(
        "".join(f"ROMEO: the night is {w} and long\n" for w in ["dark", "cold", "young"] * 40)
    )
    parquet, _ = clean_corpus(
        [InputFile(text, "u/t.txt")],
        tmp_path / "clean",
        CleanConfig(deduplicate=False, remove_eval_overlap=False),
        "monolingual",
    )
    spm = train_sentencepiece(parquet, ["text"], tmp_path / "vocab", VocabConfig(vocab_size=40))
    out = tmp_path / "model"
    train_model(
        ModelSpec(type="ngram", architecture={"order": 3}), "language_model", parquet, spm, out
    )
    return out


def test_beats_respects_the_metric_direction():
    assert beats(30.0, 25.0, higher_is_better=True) and not beats(25.0, 30.0, higher_is_better=True)
    assert beats(1.9, 2.0, higher_is_better=False) and not beats(2.0, 2.0, higher_is_better=False)
    assert beats(5.0, None, higher_is_better=False)  # no champion yet


def test_champion_alias_moves_only_when_the_challenger_wins(tmp_path, tiny_ngram_dir, prefect_api):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow_client(uri)
    exp_id = experiment_id(client, "lm-test", uri)
    decisions = []
    for bpc in (2.0, 2.5, 1.5):
        run_id = client.create_run(exp_id).info.run_id
        client.log_metric(run_id, "test_bits_per_char", bpc)
        result = register_model_version.fn(
            "lm-test",
            f"model-{bpc}",
            {"run_id": run_id, "model_dir": str(tiny_ngram_dir)},
            {"test_bits_per_char": bpc},
            "language_model",
            "test_bits_per_char",
            False,
            uri,
            {"config_hash": "abc"},
        )
        decisions.append((result["version"], result["champion"]))
    assert decisions == [("1", True), ("2", False), ("3", True)]
    champion = client.get_model_version_by_alias("lm-test", CHAMPION)
    assert str(champion.version) == "3"
    assert champion.tags["promoted_over"] == "1"
    assert client.get_model_version("lm-test", "2").tags["promoted"] == "false"

    model = mlflow.pyfunc.load_model(f"models:/lm-test@{CHAMPION}")
    continuation = model.predict(["ROMEO: the night"], params={"seed": 1})
    assert isinstance(continuation[0], str)
    perplexity = float(
        model.predict(["ROMEO: the night is dark and long"], params={"task": "score"})[0]
    )
    assert 1.0 <= perplexity < 10.0  # the model has seen this line many times


def test_language_model_continuations_run_across_line_ends(tiny_ngram_dir):
    from seqmodels.predictor import load_predictor

    predictor = load_predictor(tiny_ngram_dir)
    # The training lines all end after "long", so a continuation must cross line ends.
    text = predictor.generate(["ROMEO: the night is dark and long"], max_new_tokens=60, seed=3)[0]
    lines = text.split("\n")
    assert lines[0] == "" and len(lines) >= 3
    assert all(line.startswith("ROMEO: the night") for line in lines[1:-1])
    assert text == predictor.generate(["ROMEO: the night is dark and long"], 60, seed=3)[0]
