"""Using registered models: the translate/generate/score/compare commands and `mlflow models
serve`, against a real MLflow SQLite registry holding tiny but real models."""

from __future__ import annotations

import struct
from pathlib import Path

import mlflow
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.transactions import transaction
from typer.testing import CliRunner

from flows.cli import app
from seqmodels.config import (
    CleanConfig,
    CorpusConfig,
    EvaluationConfig,
    ExperimentConfig,
    ModelSpec,
    SourceFile,
    VocabConfig,
    parse_model_spec,
)
from seqmodels.data.clean import InputFile, clean_corpus
from seqmodels.data.vocab import train_sentencepiece
from seqmodels.evaluation.promotion import CHALLENGER, CHAMPION
from seqmodels.evaluation.scoring import evaluate_model
from seqmodels.models.folder import train_model
from tasks.modeling import fetch_model_folder, pin_model_uri, train_model_run
from tasks.registry import register_model_version
from tasks.tracking import MetricLogger, experiment_id, mlflow_client
from tests.serving import serve_and_predict

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()

# A toy German-English corpus: 4 subjects x 4 verbs x 3 places = 48 pairs.
SUBJECTS = [("Ein Mann", "A man"), ("Eine Frau", "A woman"), ("Ein Kind", "A child")]
SUBJECTS += [("Ein Hund", "A dog")]
VERBS = [("läuft", "runs"), ("schläft", "sleeps"), ("spielt", "plays"), ("wartet", "waits")]
PLACES = [(" im Park", " in the park"), (" am Strand", " on the beach"), ("", "")]
PAIRS = [
    (f"{s} {v}{p}.", f"{se} {ve}{pe}.") for s, se in SUBJECTS for v, ve in VERBS for p, pe in PLACES
]
# Tiny models that train in seconds; frequent logging makes a learning curve of a few steps.
TINY_TRANSFORMER = parse_model_spec(
    {
        "type": "transformer_seq2seq",
        "architecture": {"d_model": 32, "n_head": 2, "n_enc_layers": 1, "n_dec_layers": 1}
        | {"d_ff": 64},
        "training": {"max_steps": 80, "batch_tokens": 256, "lr": 1e-2, "warmup_steps": 5}
        | {"log_every": 5, "eval_every": 40},
    }
)
TINY_LSTM = parse_model_spec(
    {
        "type": "lstm_seq2seq",
        "architecture": {"emb_dim": 16, "enc_hidden": 16, "dec_hidden": 32},
        "training": {"max_steps": 10, "batch_tokens": 256, "lr": 1e-2, "warmup_steps": 5}
        | {"log_every": 2, "eval_every": 5},
    }
)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _translation_experiment(folder: Path) -> tuple[ExperimentConfig, Path, Path]:
    files, sources = [], []
    for split, pairs in (("train", PAIRS), ("valid", PAIRS[:6]), ("test", PAIRS[-8:])):
        for lang, side in (("de", 0), ("en", 1)):
            path = _write(folder / f"{split}.{lang}", [p[side] for p in pairs])
            files.append(InputFile(path, f"u/{split}.{lang}", split, lang))
            sources.append(SourceFile(url=path.as_uri(), split=split, lang=lang))
    clean = CleanConfig(remove_eval_overlap=False)
    parquet, _ = clean_corpus(
        files, folder / "clean", clean, "parallel", src_lang="de", tgt_lang="en"
    )
    spm = train_sentencepiece(parquet, ["src", "tgt"], folder / "vocab", VocabConfig(vocab_size=60))
    exp = ExperimentConfig(
        task="translation",
        corpus=CorpusConfig(kind="parallel", src_lang="de", tgt_lang="en", files=sources),
        clean=clean,
        models={"transformer": TINY_TRANSFORMER, "lstm": TINY_LSTM},
        evaluation=EvaluationConfig(beam_size=2, bootstrap_samples=100),
    )
    return exp, parquet, spm


def _train_logged(client, exp_id: str, name: str, *, spec: ModelSpec, task_kind: str, data, out):
    """Train in an MLflow run of its own, as the pipeline's train task does (per-step curves,
    then the summary: n_parameters, train_time_s, tokens_per_s)."""
    parquet, spm = data
    run_id = client.create_run(exp_id, run_name=name, tags={"model_type": spec.type}).info.run_id
    summary = train_model(
        spec, task_kind, parquet, spm, out, on_metrics=MetricLogger(client, run_id)
    )
    for key, value in summary.items():
        if isinstance(value, (int, float)):
            client.log_metric(run_id, key, float(value))
    return {"run_id": run_id, "model_dir": str(out)}


CORPUS_VERSION = "0123456789abcdef"  # the lineage tag of the data a version was trained on


def _register(uri: str, registered: str, name: str, *, trained: dict, task_kind: str, parquet):
    with transaction():  # the registry task records what to undo in the Prefect transaction
        register_model_version.fn(
            registered,
            name,
            trained=trained,
            task_kind=task_kind,
            tracking_uri=uri,
            lineage={"model_name": name, "corpus_version": CORPUS_VERSION},
            parquet=str(parquet),
        )
    mlflow_client(uri).set_terminated(trained["run_id"])


@pytest.fixture(scope="module")
def registry(tmp_path_factory, prefect_api) -> str:
    """A SQLite registry as the pipeline leaves it: `mt-test` with two versions (1: transformer,
    evaluated with confidence intervals, champion; 2: LSTM with hand-logged test metrics and no
    intervals, challenger) and `lm-test` with one n-gram version (champion)."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = mlflow_client(uri)
    exp, parquet, spm = _translation_experiment(folder)
    exp_id = experiment_id(client, "mt-test", uri)
    for name, spec in exp.models.items():
        trained = _train_logged(
            client,
            exp_id,
            name,
            spec=spec,
            task_kind="translation",
            data=(parquet, spm),
            out=folder / name,
        )
        if name == "transformer":
            result = evaluate_model(folder / name, parquet, exp)
            for key, value in result.metrics.items():  # test_bleu, its interval, test_chrf
                client.log_metric(trained["run_id"], key, value)
        else:  # as a run from before intervals were logged
            client.log_metric(trained["run_id"], "test_bleu", 1.5)
            client.log_metric(trained["run_id"], "test_chrf", 12.0)
        _register(uri, "mt-test", name, trained=trained, task_kind="translation", parquet=parquet)
    client.set_registered_model_alias("mt-test", CHAMPION, "1")
    client.set_registered_model_alias("mt-test", CHALLENGER, "2")

    text = _write(
        folder / "lm.txt",
        [f"ROMEO: the night is {w} and long" for w in ["dark", "cold", "young"] * 40],
    )
    lm_clean = CleanConfig(deduplicate=False, remove_eval_overlap=False)
    lm_parquet, _ = clean_corpus(
        [InputFile(text, "u/lm.txt")], folder / "lm-clean", lm_clean, "monolingual"
    )
    lm_spm = train_sentencepiece(
        lm_parquet, ["text"], folder / "lm-vocab", VocabConfig(vocab_size=40)
    )
    ngram = parse_model_spec({"type": "ngram", "architecture": {"order": 3}})
    lm_exp = experiment_id(client, "lm-test", uri)
    trained = _train_logged(
        client,
        lm_exp,
        "kn3",
        spec=ngram,
        task_kind="language_model",
        data=(lm_parquet, lm_spm),
        out=folder / "kn3",
    )
    _register(
        uri, "lm-test", "kn3", trained=trained, task_kind="language_model", parquet=lm_parquet
    )
    client.set_registered_model_alias("lm-test", CHAMPION, "1")
    return uri


def invoke(args: list[str], stdin: str | None = None):
    result = runner.invoke(app, args, input=stdin)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_translate_reads_stdin_and_writes_one_translation_per_line(registry):
    sources = ["Ein Mann läuft.", "Eine Frau schläft am Strand."]
    result = invoke(
        ["translate", "--model", "models:/mt-test@champion", "--tracking-uri", registry],
        stdin="\n".join(sources) + "\n",
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    mlflow.set_tracking_uri(registry)
    expected = mlflow.pyfunc.load_model("models:/mt-test/1").predict(sources)
    assert lines == expected  # the champion alias resolved to version 1, beam search decoded
    assert all(line.strip() for line in lines)


def test_translate_reads_a_file_and_keeps_empty_lines_aligned(registry, tmp_path, monkeypatch):
    source = _write(tmp_path / "in.de", ["Ein Hund spielt im Park.", "", "Ein Kind wartet."])
    # The store comes from MLFLOW_TRACKING_URI here; the default --model is the MT champion.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    args = ["translate", "--input", str(source), "--config", str(REPO / "configs/default.yaml")]
    result = invoke(args)
    assert result.exit_code != 0 and "models:/mt-multi30k-de-en@champion" in result.stderr
    result = invoke([*args, "--model", "models:/mt-test@champion"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.split("\n")
    assert len(lines) == 4 and lines[3] == ""  # three outputs, each ended by a newline
    assert lines[0] and lines[1] == "" and lines[2]


def test_generate_continues_each_prompt_on_one_line(registry, tmp_path):
    prompts = _write(tmp_path / "prompts.txt", ["ROMEO: the night", "ROMEO:", "the night is"])
    result = invoke(
        ["generate", "--model", "models:/lm-test@champion", "--tracking-uri", registry]
        + ["--input", str(prompts), "--max-new-tokens", "120"]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    # 120 pieces are several training lines: they run across line ends, written as \n.
    assert all("\\n" in line for line in lines)
    assert all("\\nROMEO" in line for line in lines)  # every training line starts so


def test_score_prints_a_perplexity_per_line_and_a_summary(registry):
    seen, shuffled = "ROMEO: the night is dark and long", "long and dark is night the ROMEO:"
    result = invoke(
        ["score", "--model", "models:/lm-test@champion", "--tracking-uri", registry],
        stdin=f"{seen}\n{shuffled}\n",
    )
    assert result.exit_code == 0, result.output
    ppl_seen, ppl_shuffled = (float(x) for x in result.stdout.split())
    # The line the model saw 40 times is nearly certain; its words reversed are not.
    assert 1.0 <= ppl_seen < 2.0 and ppl_shuffled > 3 * ppl_seen
    assert "2 lines: mean perplexity per token" in result.stderr


@pytest.mark.parametrize(
    "model", ["models:/mt-test@no-such-alias", "models:/no-such-model@champion"]
)
def test_a_missing_model_or_alias_is_a_clear_error(registry, model):
    result = invoke(["translate", "--model", model, "--tracking-uri", registry], stdin="Hallo\n")
    assert result.exit_code == 2
    assert model in result.stderr and result.stdout == ""


def test_a_model_of_the_other_kind_is_a_clear_error(registry):
    args = ["--model", "models:/mt-test@champion", "--tracking-uri", registry]
    result = invoke(["score", *args], stdin="Ein Mann läuft.\n")
    assert result.exit_code == 2 and "is a translation model" in result.stderr


def test_a_missing_store_is_an_error_not_a_new_empty_database(tmp_path):
    uri = f"sqlite:///{tmp_path / 'absent.db'}"
    result = invoke(["score", "--tracking-uri", uri], stdin="x\n")
    assert result.exit_code == 2 and "no MLflow database" in result.stderr
    assert not (tmp_path / "absent.db").exists()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_compare_tables_reports_plots_and_logs_every_version(registry, tmp_path):
    out = tmp_path / "report"
    result = invoke(["compare", "mt-test", "--tracking-uri", registry, "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "seq2seq" in line]
    assert len(rows) == 2
    transformer, lstm = rows
    assert "transformer" in transformer and CHAMPION in transformer and "[" in transformer
    assert "lstm" in lstm and CHALLENGER in lstm and "1.5000" in lstm and " - " in lstm

    report = (out / "comparison.md").read_text()
    assert f"| 1 | transformer | transformer_seq2seq | {CORPUS_VERSION} | " in report
    assert f"| 2 | lstm | lstm_seq2seq | {CORPUS_VERSION} | 1.5000 | - | 12.00 |" in report
    for png in ("learning_curves.png", "primary_metric.png", "test_metrics.png"):
        width, height = _png_size(out / png)
        assert width >= 500 and height >= 400 and (out / png).stat().st_size > 10_000
        assert f"]({png})" in report

    client = mlflow_client(registry)
    exp = client.get_experiment_by_name("mt-test")
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'compare'")
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "comparison")}
    assert logged == {
        "comparison/comparison.md",
        "comparison/learning_curves.png",
        "comparison/primary_metric.png",
        "comparison/test_metrics.png",
    }
    assert run.info.run_id in result.stdout

    with get_client(sync_client=True) as prefect:  # the same report as a Prefect artifact
        key = ArtifactFilter(key=ArtifactFilterKey(any_=["mt-test-comparison"]))
        (artifact,) = prefect.read_artifacts(artifact_filter=key)
    assert artifact.type == "markdown" and "| 2 | lstm | lstm_seq2seq |" in artifact.data


def test_compare_of_an_unknown_model_is_a_clear_error(registry):
    result = invoke(["compare", "no-such-model", "--tracking-uri", registry])
    assert result.exit_code == 2 and "no-such-model" in result.stderr


def test_mlflow_models_serve_translates_over_http(registry, tmp_path):
    body = {"inputs": ["Ein Mann läuft.", "Ein Hund spielt."], "params": {"task": "translate"}}
    predictions = serve_and_predict(registry, "models:/mt-test@champion", body, tmp_path)
    mlflow.set_tracking_uri(registry)
    expected = mlflow.pyfunc.load_model("models:/mt-test@champion").predict(body["inputs"])
    assert predictions == expected and all(predictions)


def test_a_training_continues_from_a_registered_version(registry, tmp_path):
    """init_from: the alias is pinned to a version, the folder is fetched from the registry,
    training starts from its weights, and the run records its parent."""
    client = mlflow_client(registry)
    assert pin_model_uri(client, "models:/mt-test@champion", "mt-test") == "models:/mt-test/1"
    assert pin_model_uri(client, "2", "mt-test") == "models:/mt-test/2"  # a bare version
    with pytest.raises(ValueError, match="no such registered version"):
        pin_model_uri(client, "models:/mt-test@nobody", "mt-test")
    parent = fetch_model_folder("models:/mt-test/1", tmp_path / "download")
    _, parquet, _ = _translation_experiment(tmp_path)  # the same pairs, written anew
    spec = parse_model_spec(
        TINY_TRANSFORMER.model_dump() | {"init_from": "models:/mt-test@champion"}
    )
    exp_id = experiment_id(client, "mt-test", registry)
    parent_run = client.create_run(exp_id, run_name="pipeline").info.run_id
    trained = train_model_run(
        "transformer",
        spec,
        task_kind="translation",
        decoding={"beam_size": 2},
        parquet=str(parquet),
        spm_model=str(parent / "spm.model"),  # a warm start keeps the parent's vocabulary
        work_dir=str(tmp_path / "work"),
        tracking_uri=registry,
        experiment_id=exp_id,
        parent_run_id=parent_run,
        workspace="test-workspace",
        init_from="models:/mt-test/1",
    )
    assert trained["lineage"] == {"init_from": "models:/mt-test/1", "parent_version": "1"}
    tags = client.get_run(trained["run_id"]).data.tags
    assert tags["parent_version"] == "1" and tags["init_from"] == "models:/mt-test/1"
    assert trained["summary"]["steps"] == 80
