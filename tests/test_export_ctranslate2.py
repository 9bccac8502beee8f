"""Export of the Transformer families to CTranslate2 (seqmodels.models.ct2_export): the
exported folder decodes like the torch model it came from, through the same predictor
interface, and the `seqmodels export` command registers it as a new version of the model."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import sacrebleu
import sentencepiece as spm
import torch
from typer.testing import CliRunner

from flows.cli import app
from seqmodels.evaluation.promotion import CHAMPION
from seqmodels.inference.ct2_predictors import REPLICAS_ENV, THREADS_ENV, CT2Layout
from seqmodels.models.folder import FORMAT, META_FILE, load_predictor
from seqmodels.models.lstm_seq2seq import LSTMSeq2SeqArchitecture
from seqmodels.models.transformer_lm import TransformerLMArchitecture
from seqmodels.models.transformer_seq2seq import TransformerSeq2SeqArchitecture
from seqmodels.training.settings import Seq2SeqTrainSettings
from tasks.registry import log_pyfunc_model
from tasks.tracking import mlflow_client
from tests.conftest import MULTI30K
from tests.model_helpers import FamilyArch, build, train_s2s
from tests.serving import serve_and_predict

pytest.importorskip("ctranslate2")
from seqmodels.models.ct2_export import export_ctranslate2  # noqa: E402

DECODING = {"beam_size": 4, "max_len_a": 1.2, "max_len_b": 10, "length_penalty": 1.0}
TEST_SENTENCES = 1000  # all of test_2016_flickr
runner = CliRunner()


def multi30k(mirror: Path, split: str, lang: str) -> list[str]:
    path = mirror / MULTI30K.removeprefix("https://") / f"{split}.{lang}.gz"
    return gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()


def write_folder(out: Path, spec: FamilyArch, task: str, spm_model: Path) -> Path:
    """The seqmodels.json a trained folder gets (seqmodels.models.folder.train_model)."""
    (out / "spm.model").write_bytes(spm_model.read_bytes())
    meta = {
        "format": FORMAT,
        "type": spec.type,
        "task": task,
        "architecture": spec.arch.model_dump(mode="json"),
        "decoding": DECODING,
    }
    (out / META_FILE).write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="session")
def multi30k_spm(mirror, tmp_path_factory) -> Path:
    """A joint de+en SentencePiece model with seqmodels' special ids."""
    lines = multi30k(mirror, "train", "de")[:8000] + multi30k(mirror, "train", "en")[:8000]
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=1000,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2,
    )  # fmt: skip
    return prefix.with_suffix(".model")


def save_model(spec: FamilyArch, vocab_size: int, out: Path, spm_model: Path, task: str) -> Path:
    """A freshly built, seeded model as a trained folder (model.pt and seqmodels.json)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save(build(spec, vocab_size, seed=0).state_dict(), out / "model.pt")
    return write_folder(out, spec, task, spm_model)


@pytest.fixture(scope="session")
def translation_folder(mirror, multi30k_spm, tmp_path_factory) -> Path:
    """A small Transformer trained on Multi30k de-en for 400 steps (about a minute on 2 CPU
    cores): BLEU about 4.5 on test_2016_flickr, a different output for most sources, and
    about one output in ten running to the maximum length, where beam search forces the EOS
    (the case where CTranslate2's search differs from seqmodels' and the predictor re-scores
    the cut hypotheses)."""
    spec = FamilyArch(
        "transformer_seq2seq",
        TransformerSeq2SeqArchitecture(
            d_model=64, n_head=4, n_enc_layers=2, n_dec_layers=2, d_ff=128, dropout=0.0,
            max_positions=128,
        ),
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(multi30k_spm))
    pairs = [
        (np.array(sp.encode(de), dtype=np.int32), np.array(sp.encode(en), dtype=np.int32))
        for de, en in zip(
            multi30k(mirror, "train", "de"), multi30k(mirror, "train", "en"), strict=True
        )
    ]
    settings = Seq2SeqTrainSettings(
        max_steps=400, batch_tokens=4096, lr=3e-3, warmup_steps=100, eval_every=400,
        log_every=400, device="cpu", valid_max_tokens=2000,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("mt")
    train_s2s(spec, sp.vocab_size(), pairs, valid_pairs=pairs[:200], cfg=settings, out_dir=out)
    return write_folder(out, spec, "translation", multi30k_spm)


@pytest.fixture(scope="session")
def torch_translations(mirror, translation_folder) -> list[str]:
    sources = multi30k(mirror, "test_2016_flickr", "de")[:TEST_SENTENCES]
    return load_predictor(translation_folder, device="cpu").translate(sources)


def test_float32_export_translates_like_seqmodels_beam_search(
    mirror, translation_folder, torch_translations, tmp_path
):
    sources = multi30k(mirror, "test_2016_flickr", "de")[:TEST_SENTENCES]
    refs = [multi30k(mirror, "test_2016_flickr", "en")[:TEST_SENTENCES]]
    exported = export_ctranslate2(translation_folder, tmp_path / "ct2", "float32")

    ct2 = load_predictor(exported, device="cpu").translate(sources)

    same = sum(a == b for a, b in zip(ct2, torch_translations, strict=True)) / len(sources)
    torch_bleu = sacrebleu.corpus_bleu(torch_translations, refs).score
    assert torch_bleu > 2 and len(set(torch_translations)) >= len(sources) // 2  # trained
    assert same >= 0.99
    assert abs(sacrebleu.corpus_bleu(ct2, refs).score - torch_bleu) <= 0.1


def test_int8_export_scores_within_half_a_bleu_point(
    mirror, translation_folder, torch_translations, tmp_path
):
    sources = multi30k(mirror, "test_2016_flickr", "de")[:TEST_SENTENCES]
    refs = [multi30k(mirror, "test_2016_flickr", "en")[:TEST_SENTENCES]]
    exported = export_ctranslate2(translation_folder, tmp_path / "ct2", "int8")

    ct2 = load_predictor(exported, device="cpu").translate(sources)

    meta = json.loads((exported / META_FILE).read_text())
    assert (meta["runtime"], meta["quantization"]) == ("ctranslate2", "int8")
    torch_bleu = sacrebleu.corpus_bleu(torch_translations, refs).score
    assert abs(sacrebleu.corpus_bleu(ct2, refs).score - torch_bleu) <= 0.5


def test_replicas_decode_shares_of_a_batch_side_by_side_with_the_same_translations(
    mirror, translation_folder, torch_translations, tmp_path, monkeypatch
):
    sources = multi30k(mirror, "test_2016_flickr", "de")[:300]
    exported = export_ctranslate2(translation_folder, tmp_path / "ct2", "float32")
    monkeypatch.setenv(REPLICAS_ENV, "2")  # how `mlflow models serve` gets a layout
    monkeypatch.setenv(THREADS_ENV, "2")

    predictor = load_predictor(exported, device="cpu")
    translations = predictor.translate(sources)

    assert predictor.translator.num_translators == 2
    assert predictor.layout == CT2Layout(replicas=2, threads=2)
    same = sum(a == b for a, b in zip(translations, torch_translations, strict=False))
    assert same / len(sources) >= 0.99


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({REPLICAS_ENV: "0"}, "SEQMODELS_CT2_REPLICAS='0': must be a whole number >= 1"),
        ({REPLICAS_ENV: "two"}, "SEQMODELS_CT2_REPLICAS='two': must be a whole number >= 1"),
        ({THREADS_ENV: "-1"}, "SEQMODELS_CT2_THREADS='-1': must be a whole number >= 0"),
    ],
)
def test_a_bad_ctranslate2_layout_variable_is_named(environ, message):
    with pytest.raises(ValueError, match=message):
        CT2Layout.from_env(environ)


def test_a_ctranslate2_layout_shares_the_threads_and_the_batch_among_replicas():
    assert CT2Layout.from_env({}) == CT2Layout(replicas=1, threads=0)
    one = CT2Layout.from_env({REPLICAS_ENV: "1", THREADS_ENV: "8"})
    assert one.runtime_options() == {"inter_threads": 1, "intra_threads": 8}
    assert one.max_batch_size(32) == 0  # the whole batch in one piece
    three = CT2Layout.from_env({REPLICAS_ENV: " 3 ", THREADS_ENV: "8"})
    assert three.runtime_options() == {"inter_threads": 3, "intra_threads": 2}
    assert [three.max_batch_size(n) for n in (1, 31, 32, 33)] == [1, 11, 11, 11]
    # 0 threads: the cores this process may use (a container's CPU set), not the host's.
    cores = len(os.sched_getaffinity(0))
    assert CT2Layout().runtime_options() == {"inter_threads": 1, "intra_threads": cores}
    with pytest.raises(ValueError, match="2 threads .* cannot run 4 replicas"):
        CT2Layout.from_env({REPLICAS_ENV: "4", THREADS_ENV: "2"})


def test_language_model_export_continues_like_seqmodels_greedy(
    mirror, multi30k_spm, tmp_path, monkeypatch
):
    spec = FamilyArch(
        "transformer_lm",
        TransformerLMArchitecture(block_size=64, n_layer=2, n_head=4, d_model=64, d_ff=128),
    )
    vocab_size = spm.SentencePieceProcessor(model_file=str(multi30k_spm)).vocab_size()
    folder = save_model(spec, vocab_size, tmp_path / "lm", multi30k_spm, "language_model")
    prompts = multi30k(mirror, "test_2016_flickr", "en")[:20]
    prompts = [" ".join(p.split()[:4]) for p in prompts]

    exported = export_ctranslate2(folder, tmp_path / "ct2", "float32")

    want = load_predictor(folder, device="cpu").generate(
        prompts, max_new_tokens=30, temperature=0.0
    )
    ct2 = load_predictor(exported, device="cpu")
    got = ct2.generate(prompts, max_new_tokens=30, temperature=0.0)
    assert got == want
    monkeypatch.setenv(REPLICAS_ENV, "2")
    replicas = load_predictor(exported, device="cpu")
    assert replicas.generator.num_generators == 2
    assert replicas.generate(prompts, max_new_tokens=30, temperature=0.0) == want
    # Sampling with a seed draws the same continuations again (generate_batch takes none).
    sampled = [ct2.generate(prompts, max_new_tokens=30, temperature=1.0, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    assert replicas.generate(prompts, max_new_tokens=30, temperature=1.0, seed=1) == sampled[0]
    assert len(set(want)) > 1
    with pytest.raises(ValueError, match="more than this CTranslate2 model's 64"):
        ct2.generate(
            prompts[:1], max_new_tokens=64, temperature=0.0
        )  # learned positions cannot slide


def test_a_family_without_a_ctranslate2_layout_is_refused(multi30k_spm, tmp_path):
    spec = FamilyArch(
        "lstm_seq2seq", LSTMSeq2SeqArchitecture(emb_dim=16, enc_hidden=16, dec_hidden=16)
    )
    vocab_size = spm.SentencePieceProcessor(model_file=str(multi30k_spm)).vocab_size()
    folder = save_model(spec, vocab_size, tmp_path / "lstm", multi30k_spm, "translation")

    with pytest.raises(ValueError, match="lstm_seq2seq model cannot be exported to CTranslate2"):
        export_ctranslate2(folder, tmp_path / "ct2")
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        export_ctranslate2(folder, tmp_path / "ct2", "int4")


def register(uri: str, name: str, folder: Path) -> str:
    """Log a model folder as the pipeline's register task does; its version number."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run():
        info = log_pyfunc_model(str(folder), "translation", ["Ein Mann fährt Fahrrad."], name)
    return str(info.registered_model_version)


def test_export_command_registers_a_ctranslate2_version_beside_the_champion(
    mirror, translation_folder, tmp_path
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = register(uri, "mt-ct2", translation_folder)
    client = mlflow_client(uri)
    client.set_registered_model_alias("mt-ct2", CHAMPION, parent)
    client.set_model_version_tag("mt-ct2", parent, "model_name", "transformer")  # as `register`
    parent_run = client.get_model_version("mt-ct2", parent).run_id
    sources = multi30k(mirror, "test_2016_flickr", "de")[:5]

    result = runner.invoke(app, [
        "export", "models:/mt-ct2@champion", "--format", "ctranslate2",
        "--quantization", "int8", "--out", str(tmp_path / "exported"), "--tracking-uri", uri,
    ])  # fmt: skip

    assert result.exit_code == 0, result.output
    version = client.get_model_version("mt-ct2", "2")
    assert result.stdout.strip() == "models:/mt-ct2/2"
    assert {k: version.tags[k] for k in ("format", "quantization", "parent_version")} == {
        "format": "ctranslate2", "quantization": "int8", "parent_version": parent,
    }  # fmt: skip
    assert version.tags["model_name"] == "transformer"  # the parent's, for `seqmodels compare`
    # A packaging of the champion, not a challenger: the aliases stay, and the parent's run
    # still names only the parent's version (what a re-run of its register task looks up).
    assert str(client.get_model_version_by_alias("mt-ct2", CHAMPION).version) == parent
    assert client.get_registered_model("mt-ct2").aliases == {CHAMPION: int(parent)}
    parent_versions = client.search_model_versions(f"run_id = '{parent_run}'")
    assert [str(v.version) for v in parent_versions] == [parent]
    expected = load_predictor(tmp_path / "exported", device="cpu").translate(sources)
    served = mlflow.pyfunc.load_model("models:/mt-ct2/2")
    assert served.predict(sources) == expected
    body = {"inputs": sources, "params": {"task": "translate"}}
    assert serve_and_predict(uri, "models:/mt-ct2/2", body, tmp_path) == expected  # over HTTP
    translated = runner.invoke(
        app,
        ["translate", "--model", "models:/mt-ct2/2", "--tracking-uri", uri],
        input="\n".join(sources) + "\n",
    )
    assert translated.exit_code == 0, translated.output
    assert translated.stdout.splitlines() == expected


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--format", "onnx"], "unknown --format 'onnx'"),
        (["--quantization", "int4"], "unknown --quantization 'int4'"),
    ],
)
def test_export_command_refuses_an_unknown_format_or_quantization(tmp_path, options, message):
    out = ["--out", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path / 'db'}"]

    result = runner.invoke(app, ["export", "models:/mt/1", *out, *options])

    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_export_command_refuses_a_family_without_a_ctranslate2_layout(multi30k_spm, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = FamilyArch(
        "lstm_seq2seq", LSTMSeq2SeqArchitecture(emb_dim=16, enc_hidden=16, dec_hidden=16)
    )
    vocab_size = spm.SentencePieceProcessor(model_file=str(multi30k_spm)).vocab_size()
    lstm = save_model(spec, vocab_size, tmp_path / "lstm", multi30k_spm, "translation")
    register(uri, "mt-lstm", lstm)

    result = runner.invoke(
        app, ["export", "models:/mt-lstm/1", "--out", str(tmp_path / "out"), "--tracking-uri", uri]
    )

    assert result.exit_code == 2
    assert "lstm_seq2seq model cannot be exported to CTranslate2" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
