"""Train a SentencePiece vocabulary from the cleaned Parquet (train split only)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import sentencepiece as spm

from seqmodels import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from seqmodels.data.settings import VocabConfig


def train_sentencepiece(
    parquet_path: Path, columns: list[str], out_dir: Path, cfg: VocabConfig, seed: int = 0
) -> Path:
    """Train on the train split of `columns` (both sides for a joint MT vocabulary).

    Returns `out_dir/spm.model`. The size is a soft limit (`hard_vocab_limit=False`) so a small
    corpus yields a smaller vocabulary instead of an error; the real size is in the model.
    """
    table = pq.read_table(parquet_path, columns=["split", *columns])
    table = table.filter(pc.equal(table["split"], "train"))
    if table.num_rows == 0:
        raise ValueError(f"{parquet_path}: no train rows to learn a vocabulary from")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        text_path = Path(tmp) / "train.txt"
        with open(text_path, "w", encoding="utf-8") as f:
            for column in columns:
                for line in table[column].to_pylist():
                    f.write(line + "\n")
        prefix = Path(tmp) / "spm"
        spm.set_random_generator_seed(seed)  # sampling of large corpora is then repeatable
        spm.SentencePieceTrainer.train(
            input=str(text_path),
            model_prefix=str(prefix),
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            input_sentence_size=cfg.max_sentences,
            shuffle_input_sentence=True,
            seed_sentencepiece_size=1_000_000,
            hard_vocab_limit=False,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        target = out_dir / "spm.model"
        shutil.copyfile(f"{prefix}.vocab", out_dir / "spm.vocab")
        os.replace(f"{prefix}.model", target)
    return target
