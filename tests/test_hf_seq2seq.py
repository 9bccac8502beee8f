"""Pretrained Hugging Face encoder-decoders (tiny random Marian and T5 made here, no hub)
fine-tuned through the seqmodels trainer with their own tokenizers and framing, decoded with
their own beam search, and loaded back from the model folder alone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra is not installed")

from seqmodels.config import VocabConfig, parse_model_spec  # noqa: E402
from seqmodels.data.vocab import train_sentencepiece  # noqa: E402
from seqmodels.evaluation.metrics import translation_metrics  # noqa: E402
from seqmodels.models import get_family  # noqa: E402
from seqmodels.models.folder import load_predictor, model_lineage, train_model  # noqa: E402
from seqmodels.training.checkpoint import list_checkpoints  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.hf_checkpoints import make_tiny_marian, make_tiny_t5  # noqa: E402

# A word-for-word "language pair": easy enough for a tiny model to start learning in a few
# dozen steps, so a falling loss means the framing and the targets are right.
LEXICON = {
    "ein": "a", "hund": "dog", "mann": "man", "sieht": "sees", "die": "the", "katze": "cat",
    "frau": "woman", "rot": "red", "spielt": "plays", "ball": "ball", "im": "in", "park": "park",
}  # fmt: skip


@pytest.fixture(autouse=True)
def offline(monkeypatch, single_thread_torch):
    """No test here may reach the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, list[tuple[str, str]]]:
    folder = tmp_path_factory.mktemp("hf_pairs")
    rng = np.random.default_rng(0)
    words = list(LEXICON)
    pairs = []
    for _ in range(300):
        src = list(rng.choice(words, size=rng.integers(3, 7)))
        pairs.append((" ".join(src), " ".join(LEXICON[w] for w in src)))
    splits = ["train"] * 260 + ["valid"] * 20 + ["test"] * 20
    parquet = folder / "mt.parquet"
    table = {
        "id": list(range(len(pairs))),
        "split": splits,
        "src": [s for s, _ in pairs],
        "tgt": [t for _, t in pairs],
    }
    pq.write_table(pa.table(table), parquet)
    vocab = VocabConfig(vocab_size=40)
    spm_model = train_sentencepiece(parquet, ["src", "tgt"], folder / "spm", vocab)
    return parquet, spm_model, pairs


@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory, corpus) -> Path:
    lines = [side for pair in corpus[2] for side in pair]
    return make_tiny_marian(tmp_path_factory.mktemp("tiny_marian"), lines)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory, corpus) -> Path:
    lines = [side for pair in corpus[2] for side in pair] + ["translate German to English:"]
    return make_tiny_t5(tmp_path_factory.mktemp("tiny_t5"), lines)


def spec(pretrained: Path | str, architecture: dict | None = None, **training):
    settings = {"max_steps": 80, "batch_tokens": 400, "lr": 3e-3, "warmup_steps": 8}
    settings |= {"eval_every": 40, "log_every": 1, "label_smoothing": 0.0, **training}
    return parse_model_spec(
        {
            "type": "hf_seq2seq",
            "architecture": {"pretrained": str(pretrained), **(architecture or {})},
            "training": settings,
        }
    )


def fine_tune(model_spec, corpus, out_dir: Path, **hooks) -> tuple[dict, list[float]]:
    parquet, spm_model, _ = corpus
    losses: list[float] = []

    def on_metrics(metrics: dict, step: int) -> None:
        if "train_loss" in metrics:
            losses.append(metrics["train_loss"])
        if "stop" in hooks:
            hooks["stop"](step)

    decoding = {"beam_size": 2, "max_len_a": 1.0, "max_len_b": 4}
    summary = train_model(
        model_spec,
        "translation",
        parquet,
        spm_model,
        out_dir,
        decoding=decoding,
        on_metrics=on_metrics,
    )
    return summary, losses


def test_each_checkpoint_frames_its_sequences_its_own_way(tiny_marian, tiny_t5):
    family = get_family("hf_seq2seq")
    marian = spec(tiny_marian).architecture
    tok = family.load_tokenizer(tiny_marian, marian)
    framing = family.framing(marian, tok)
    eos, pad = tok.tokenizer.eos_token_id, tok.tokenizer.pad_token_id
    assert (eos, pad) == (0, len(tok.tokenizer) - 1)  # opus-mt's: </s> is 0, <pad> the last
    assert framing.src_prefix == () and framing.src_suffix == (eos,)
    assert framing.tgt_prefix == (pad,) and framing.tgt_suffix == (eos,)
    assert framing.pad_id == pad

    t5 = spec(tiny_t5).architecture
    framing = family.framing(t5, family.load_tokenizer(tiny_t5, t5))
    assert framing.src_suffix == (1,) and framing.tgt_prefix == (0,) and framing.pad_id == 0


def test_marian_fine_tunes_and_translates_from_its_folder_alone(tiny_marian, corpus, tmp_path):
    checkpoint = shutil.copytree(tiny_marian, tmp_path / "checkpoint")
    summary, losses = fine_tune(spec(checkpoint), corpus, tmp_path / "model")
    assert summary["steps"] == 80 and summary["vocab_size"] == 41  # 40 pieces and <pad>
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    shutil.rmtree(checkpoint)  # the folder must not need the checkpoint any more

    predictor = load_predictor(tmp_path / "model", device="cpu")
    test = corpus[2][-20:]
    hypotheses = predictor.translate([s for s, _ in test])
    assert len(hypotheses) == 20 and all(isinstance(h, str) for h in hypotheses)
    scores, _ = translation_metrics(hypotheses, [t for _, t in test])
    assert scores["test_bleu"] >= 0 and scores["test_chrf"] > 5  # learning the lexicon
    assert predictor.beam_size == 2


def test_a_t5_task_prefix_goes_before_every_source(tiny_t5, corpus, tmp_path):
    prefix = "translate German to English: "
    model_spec = spec(tiny_t5, {"source_prefix": prefix}, max_steps=6)
    family = get_family("hf_seq2seq")
    tok = family.load_tokenizer(tiny_t5, model_spec.architecture)
    sources, targets = family.encode_pairs(
        model_spec.architecture, tok, {"src": ["ein hund"], "tgt": ["a dog"]}
    )
    expected = tok.encode([prefix + "ein hund"])[0]
    assert sources[0].tolist() == expected and targets[0].tolist() == tok.encode(["a dog"])[0]

    summary, losses = fine_tune(model_spec, corpus, tmp_path / "model")
    assert summary["steps"] == 6 and all(np.isfinite(losses))
    predictor = load_predictor(tmp_path / "model", device="cpu")
    assert predictor.source_prefix == prefix
    assert len(predictor.translate(["ein hund sieht die katze"])) == 1


class Interrupted(Exception):
    pass


def test_an_interrupted_fine_tuning_resumes_to_the_same_weights(tiny_marian, corpus, tmp_path):
    settings = {"max_steps": 12, "checkpoint_every": 4, "eval_every": 100, "keep_last": 5}
    fine_tune(spec(tiny_marian, **settings), corpus, tmp_path / "whole")

    def stop_at_7(step: int) -> None:
        if step >= 7:
            raise Interrupted  # as if killed after the step-4 checkpoint

    with pytest.raises(Interrupted):
        fine_tune(spec(tiny_marian, **settings), corpus, tmp_path / "cut", stop=stop_at_7)
    assert list_checkpoints(tmp_path / "cut" / "checkpoints")[-1][0] == 4
    summary, _ = fine_tune(spec(tiny_marian, **settings), corpus, tmp_path / "cut")
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 12
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_the_lineage_names_the_checkpoint_and_digests_its_weights(tiny_marian, tmp_path):
    tags = model_lineage(spec(tiny_marian))
    assert tags["pretrained"] == str(tiny_marian)
    assert len(tags["pretrained_weights_sha256"]) == 64
    copy = shutil.copytree(tiny_marian, tmp_path / "copy")
    assert (
        model_lineage(spec(copy))["pretrained_weights_sha256"]
        == (tags["pretrained_weights_sha256"])
    )
    weights = next(copy.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit of one weight
    assert (
        model_lineage(spec(copy))["pretrained_weights_sha256"]
        != (tags["pretrained_weights_sha256"])
    )


def write_spec(folder: Path, name: str, checkpoint: Path, parquet: Path, training: dict) -> Path:
    """A seqmodels.torchrun spec fine-tuning `checkpoint` on the cleaned corpus."""
    spec = {
        "type": "hf_seq2seq",
        "architecture": {"pretrained": str(checkpoint)},
        "training": training,
        "data": {"parquet": str(parquet)},
        "out_dir": name,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def process_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_a_fine_tuning_killed_with_sigkill_resumes_to_the_same_weights(
    tiny_marian, corpus, tmp_path
):
    training = {"max_steps": 200, "batch_tokens": 200, "lr": 3e-3, "warmup_steps": 5}
    training |= {"eval_every": 1000, "log_every": 50, "checkpoint_every": 20, "keep_last": 3}
    cmd = [sys.executable, "-m", "seqmodels.torchrun", "--spec"]
    whole = write_spec(tmp_path, "whole", tiny_marian, corpus[0], training)
    subprocess.run([*cmd, str(whole)], env=process_env(), check=True, timeout=600)

    killed = write_spec(tmp_path, "killed", tiny_marian, corpus[0], training)
    process = subprocess.Popen([*cmd, str(killed)], env=process_env())
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints.is_dir() and list_checkpoints(checkpoints)):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "seqmodels.json").exists()  # it did not finish
    done = subprocess.run([*cmd, str(killed)], env=process_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["resumed_from_step"] >= 20
    first = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    again = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_two_process_ddp_fine_tuning_matches_one_process(tiny_marian, corpus, tmp_path):
    """torchrun with 2 CPU processes (gloo) sees the same global batches as one process."""
    training = {"max_steps": 4, "batch_tokens": 300, "lr": 3e-3, "warmup_steps": 1}
    training |= {"eval_every": 4, "log_every": 1, "checkpoint_every": 4}

    def write(name: str) -> Path:
        return write_spec(tmp_path, name, tiny_marian, corpus[0], training)

    env = process_env()
    one = [sys.executable, "-m", "seqmodels.torchrun", "--spec", str(write("single"))]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    two += ["-m", "seqmodels.torchrun", "--spec", str(write("ddp"))]
    for cmd in (one, two):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def losses(name: str) -> dict[int, float]:
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}

    single, ddp = losses("single"), losses("ddp")
    assert sorted(single) == sorted(ddp) == [1, 2, 3, 4]
    for step, loss in single.items():
        assert ddp[step] == pytest.approx(loss, rel=1e-4), step
