"""Read cleaned splits from Parquet and turn them into token-id arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sentencepiece as spm

from seqmodels import EOS_ID


def read_split(parquet_path: Path, split: str, columns: list[str]) -> dict[str, list[Any]]:
    """The rows of one split, in corpus order, as {column: [text, ...]}; a list column (`refs`,
    the extra references of a summarisation corpus) gives one list of strings per row."""
    table = pq.read_table(parquet_path, columns=["id", "split", *columns])
    table = table.filter(pc.equal(table["split"], split)).sort_by("id")
    return {c: table[c].to_pylist() for c in columns}


def encode_lines(sp: spm.SentencePieceProcessor, lines: list[str]) -> list[np.ndarray]:
    # `sp`: SentencePiece or anything with the same batch `encode` (a family's tokenizer)
    return [np.asarray(ids, dtype=np.int32) for ids in sp.encode(lines)]


def language_model_stream(sentences: list[np.ndarray], eos: int = EOS_ID) -> np.ndarray:
    """One flat stream: EOS, then each line's pieces followed by EOS (`eos`: the end-of-line
    id of the tokenizer; SentencePiece's by default).

    The leading EOS is the "start of text" context, so every line, the first included, is
    predicted from a boundary symbol, exactly as the n-gram model sees `<s>`.
    """
    boundary = np.array([eos], dtype=np.int32)
    parts = [boundary]
    for ids in sentences:
        parts += [ids, boundary]
    return np.concatenate(parts)
