"""Fine-tuned Hugging Face models in the registry: logged with MLflow's transformers flavor
(a Hugging Face pipeline back from mlflow.transformers, a pyfunc like every other model, an
HTTP server from `mlflow models serve`), used by `seqmodels translate|generate|score`, and
continued by a warm start from a registered version. Tiny random checkpoints made here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra is not installed")

from prefect.transactions import transaction  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from flows.cli import app  # noqa: E402
from seqmodels.config import parse_model_spec  # noqa: E402
from seqmodels.models.folder import check_warm_start  # noqa: E402
from tasks.modeling import fetch_model_folder, train_model_run  # noqa: E402
from tasks.registry import register_model_version  # noqa: E402
from tasks.tracking import experiment_id, mlflow_client  # noqa: E402
from tests.hf_checkpoints import make_tiny_bert, make_tiny_marian  # noqa: E402
from tests.model_helpers import make_tiny_gpt2  # noqa: E402
from tests.serving import serve_and_predict  # noqa: E402

runner = CliRunner()
LEXICON = {"ein": "a", "hund": "dog", "mann": "man", "sieht": "sees", "die": "the"}
LEXICON |= {"katze": "cat", "frau": "woman", "spielt": "plays"}


@pytest.fixture(autouse=True)
def offline(monkeypatch, single_thread_torch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def _corpus(folder: Path) -> tuple[Path, Path]:
    """An LM and an MT Parquet in the cleaned schema (a word-for-word language pair)."""
    words = list(LEXICON)
    sources = [" ".join(words[(i + k) % len(words)] for k in range(3 + i % 4)) for i in range(160)]
    targets = [" ".join(LEXICON[w] for w in s.split()) for s in sources]
    splits = ["train"] * 130 + ["valid"] * 15 + ["test"] * 15
    ids = list(range(160))
    mt = folder / "mt.parquet"
    pq.write_table(pa.table({"id": ids, "split": splits, "src": sources, "tgt": targets}), mt)
    lm = folder / "lm.parquet"
    pq.write_table(pa.table({"id": ids, "split": splits, "text": targets}), lm)
    return lm, mt


def _train_and_register(uri: str, name: str, spec, *, task_kind: str, parquet: Path, work: Path):
    """As the pipeline does: the train task (with lineage), then the register task."""
    client = mlflow_client(uri)
    exp_id = experiment_id(client, name, uri)
    parent = client.create_run(exp_id, run_name="pipeline").info.run_id
    trained = train_model_run(
        "hf",
        spec,
        task_kind=task_kind,
        decoding={"beam_size": 2},
        parquet=str(parquet),
        spm_model=None,
        work_dir=str(work),
        tracking_uri=uri,
        experiment_id=exp_id,
        parent_run_id=parent,
        workspace="test-workspace",
    )
    with transaction():
        registered = register_model_version.fn(
            name,
            "hf",
            trained=trained,
            task_kind=task_kind,
            tracking_uri=uri,
            lineage=trained["lineage"],
            parquet=str(parquet),
        )
    client.set_terminated(trained["run_id"])
    return trained, registered


@pytest.fixture(scope="module")
def registry(tmp_path_factory, prefect_api) -> dict:
    folder = tmp_path_factory.mktemp("hf_registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    lm, mt = _corpus(folder)
    lines = (
        pq.read_table(mt).column("src").to_pylist() + pq.read_table(mt).column("tgt").to_pylist()
    )
    gpt2 = make_tiny_gpt2(folder / "gpt2", lines)
    marian = make_tiny_marian(folder / "marian", lines)
    training = {"max_steps": 8, "batch_tokens": 256, "eval_every": 4, "log_every": 2}
    gpt2_spec = parse_model_spec(
        {
            "type": "hf_causal_lm",
            "architecture": {"pretrained": str(gpt2)},
            "training": training | {"block_size": 32},
        }
    )
    marian_spec = parse_model_spec(
        {"type": "hf_seq2seq", "architecture": {"pretrained": str(marian)}, "training": training}
    )
    _train_and_register(
        uri, "hf-lm", gpt2_spec, task_kind="language_model", parquet=lm, work=folder / "work"
    )
    bert_spec = parse_model_spec(
        {
            "type": "hf_masked_lm",
            "architecture": {"pretrained": str(make_tiny_bert(folder / "bert", lines))},
            "training": training | {"block_size": 32},
        }
    )
    _train_and_register(
        uri, "hf-mlm", bert_spec, task_kind="language_model", parquet=lm, work=folder / "work"
    )
    trained, _ = _train_and_register(
        uri, "hf-mt", marian_spec, task_kind="translation", parquet=mt, work=folder / "work"
    )
    shutil.copyfile(Path(trained["model_dir"]) / "model.pt", folder / "registered.pt")
    return {"uri": uri, "marian_spec": marian_spec, "mt": mt, "folder": folder, "marian": marian}


def test_versions_use_the_transformers_flavor_and_name_their_checkpoint(registry):
    client = mlflow_client(registry["uri"])
    version = client.get_model_version("hf-mt", "1")
    assert version.tags["pretrained"] == str(registry["marian"])
    assert len(version.tags["pretrained_weights_sha256"]) == 64
    mlflow.set_tracking_uri(registry["uri"])
    info = mlflow.models.get_model_info("models:/hf-mt/1")
    assert "transformers" in info.flavors and info.metadata["seqmodels"]["type"] == "hf_seq2seq"


def test_mlflow_gives_back_a_hugging_face_pipeline_and_a_pyfunc(registry):
    mlflow.set_tracking_uri(registry["uri"])
    pipeline = mlflow.transformers.load_model("models:/hf-mt/1", return_type="pipeline")
    assert type(pipeline).__name__ == "TranslationPipeline"
    out = pipeline(["ein hund sieht die katze"])[0]["translation_text"]
    pyfunc = mlflow.pyfunc.load_model("models:/hf-mt/1")
    assert pyfunc.predict(["ein hund sieht die katze"]) == [out]

    filler = mlflow.transformers.load_model("models:/hf-mlm/1", return_type="pipeline")
    assert type(filler).__name__ == "FillMaskPipeline"
    filled = mlflow.pyfunc.load_model("models:/hf-mlm/1").predict(["the cat [MASK] on a mat"])
    assert len(filled) == 1 and isinstance(filled[0], str)

    generator = mlflow.pyfunc.load_model("models:/hf-lm/1")
    texts = generator.predict(["a dog"], params={"max_new_tokens": 8, "do_sample": False})
    assert len(texts) == 1 and isinstance(texts[0], str) and texts[0].startswith("a dog")


def _invoke(args: list[str], stdin: str):
    result = runner.invoke(app, args, input=stdin)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_seqmodels_translate_generate_and_score_accept_them(registry):
    uri = ["--tracking-uri", registry["uri"]]
    out = _invoke(["translate", "-m", "models:/hf-mt/1", *uri], "ein hund\n\ndie katze\n")
    assert out.exit_code == 0 and len(out.stdout.splitlines()) == 3
    assert out.stdout.splitlines()[1] == ""  # an empty line stays empty
    out = _invoke(["generate", "-m", "models:/hf-lm/1", "--max-new-tokens", "5", *uri], "a\n")
    assert out.exit_code == 0 and len(out.stdout.splitlines()) == 1
    out = _invoke(["score", "-m", "models:/hf-lm/1", *uri], "a dog sees the cat\nthe man\n")
    assert out.exit_code == 0
    assert all(float(v) > 1 for v in out.stdout.splitlines())
    out = _invoke(["score", "-m", "models:/hf-mlm/1", *uri], "a dog sees the cat\n")
    assert out.exit_code == 0 and float(out.stdout.splitlines()[0]) > 1  # PLL perplexity
    out = _invoke(["generate", "-m", "models:/hf-mlm/1", *uri], "a dog\n")
    assert out.exit_code == 2 and "does not generate text" in out.output
    wrong = _invoke(["translate", "-m", "models:/hf-lm/1", *uri], "a\n")
    assert wrong.exit_code == 2 and "seqmodels generate or score" in wrong.output


def test_mlflow_models_serve_answers_for_a_transformers_model(registry, tmp_path):
    inputs = ["ein mann spielt", "die frau sieht"]
    predictions = serve_and_predict(
        registry["uri"], "models:/hf-mt/1", {"inputs": inputs}, tmp_path
    )
    mlflow.set_tracking_uri(registry["uri"])
    assert predictions == mlflow.pyfunc.load_model("models:/hf-mt/1").predict(inputs)


def test_a_fine_tuning_continues_from_a_registered_version(registry, tmp_path):
    parent = fetch_model_folder("models:/hf-mt/1", tmp_path / "download")
    spec = parse_model_spec(registry["marian_spec"].model_dump() | {"init_from": "models:/hf-mt/1"})
    uri = registry["uri"]
    client = mlflow_client(uri)
    exp_id = experiment_id(client, "hf-mt", uri)
    run = client.create_run(exp_id, run_name="pipeline").info.run_id
    trained = train_model_run(
        "hf",
        spec,
        task_kind="translation",
        decoding={"beam_size": 2},
        parquet=str(registry["mt"]),
        spm_model=None,
        work_dir=str(tmp_path / "work"),
        tracking_uri=uri,
        experiment_id=exp_id,
        parent_run_id=run,
        workspace="test-workspace",
        init_from="models:/hf-mt/1",
    )
    assert trained["lineage"]["parent_version"] == "1"
    assert trained["lineage"]["pretrained"] == str(registry["marian"])
    meta = json.loads((parent / "seqmodels.json").read_text())
    assert meta["type"] == "hf_seq2seq"
    # The folder rebuilt from the registered pipeline holds the registered weights.
    start = torch.load(parent / "model.pt", weights_only=True)
    registered = torch.load(registry["folder"] / "registered.pt", weights_only=True)
    assert all(torch.equal(start[k], registered[k]) for k in registered)
    assert trained["summary"]["steps"] == 8


def test_a_warm_start_needs_the_same_checkpoint_and_tokenizer(registry, tmp_path):
    parent = fetch_model_folder("models:/hf-mt/1", tmp_path / "download")
    same = parse_model_spec(registry["marian_spec"].model_dump())
    assert check_warm_start(parent, same, None) == parent / "model.pt"

    other = make_tiny_marian(tmp_path / "other", ["zwei drei vier fünf", "two three four"] * 20)
    another = parse_model_spec({"type": "hf_seq2seq", "architecture": {"pretrained": str(other)}})
    with pytest.raises(ValueError, match="architecture"):  # another checkpoint named
        check_warm_start(parent, another, None)
    # The same checkpoint named, but the parent was trained with another tokenizer.
    swapped = shutil.copytree(parent, tmp_path / "swapped")
    for name in ("vocab.json", "source.spm", "target.spm"):
        shutil.copyfile(other / name, swapped / "hf" / name)
    with pytest.raises(ValueError, match="vocabulary .*hf, which differs"):
        check_warm_start(swapped, same, None)
