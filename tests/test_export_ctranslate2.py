"""Export of the Transformer families to CTranslate2 (seqmodels.models.ct2_export): the
exported folder decodes like the torch model it came from, through the same predictor
interface, and the `seqmodels export` command registers it as a new version of the model."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import sacrebleu
import sentencepiece as spm

from seqmodels.models.folder import META_FILE, FORMAT, load_predictor
from seqmodels.models.lstm_seq2seq import LSTMSeq2SeqArchitecture
from seqmodels.models.transformer_lm import TransformerLMArchitecture
from seqmodels.models.transformer_seq2seq import TransformerSeq2SeqArchitecture
from seqmodels.training.settings import LMTrainSettings, Seq2SeqTrainSettings
from tests.conftest import MULTI30K
from tests.model_helpers import FamilyArch, train_lm, train_s2s

pytest.importorskip("ctranslate2")
from seqmodels.models.ct2_export import export_ctranslate2  # noqa: E402

DECODING = {"beam_size": 4, "max_len_a": 1.2, "max_len_b": 10, "length_penalty": 1.0}
TEST_SENTENCES = 400


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


@pytest.fixture(scope="session")
def translation_folder(mirror, multi30k_spm, tmp_path_factory) -> Path:
    """A small Transformer trained briefly on Multi30k de-en: its outputs are real words."""
    sp = spm.SentencePieceProcessor(model_file=str(multi30k_spm))
    de, en = multi30k(mirror, "train", "de")[:12000], multi30k(mirror, "train", "en")[:12000]
    pairs = list(zip(sp.encode(de), sp.encode(en), strict=True))
    spec = FamilyArch(
        "transformer_seq2seq",
        TransformerSeq2SeqArchitecture(
            d_model=64, n_head=4, n_enc_layers=2, n_dec_layers=2, d_ff=128, dropout=0.0,
            max_positions=128,
        ),
    )  # fmt: skip
    cfg = Seq2SeqTrainSettings(
        max_steps=250, batch_tokens=3000, lr=3e-3, warmup_steps=30, eval_every=250,
        log_every=250, device="cpu", valid_max_tokens=2000, resume=False,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("mt")
    train_s2s(spec, sp.vocab_size(), pairs, pairs[:200], cfg, out)
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
    assert torch_bleu > 3  # a model that learnt something: the comparison means something
    assert same >= 0.99
    assert abs(sacrebleu.corpus_bleu(ct2, refs).score - torch_bleu) <= 0.1
