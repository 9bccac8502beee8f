"""Train a model from a JSON spec, on one process or under torchrun (data parallel).

    torchrun --nproc_per_node 8 -m seqmodels.torchrun --spec spec.json [more.json ...]
    torchrun --nnodes 2 --node_rank 0 --rdzv_endpoint host:29500 --nproc_per_node 8 \
        -m seqmodels.torchrun --spec spec.json

A spec (relative paths are resolved against the spec's folder):

    {"type": "<a registered model type, e.g. transformer_lm>",
     "architecture": {...}, "training": {...},          # the family's typed settings
     "data": {"train": "train.npy", "valid": "valid.npy"}        # LM id streams (np.save)
           | {"train": "train.npz", "valid": "valid.npz"}        # pairs (save_pairs)
           | {"parquet": "corpus.parquet", "spm": "spm.model"},  # cleaned corpus + vocab
                                              # (no spm for a pretrained checkpoint's family)
     "vocab_size": 8000,                                 # with npy/npz data
     "out_dir": "model", "metrics_file": "metrics.jsonl"}        # metrics: optional

With parquet data the result is a complete model folder (seqmodels.models.folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from seqmodels.config import TASK_FAMILIES
from seqmodels.models import LANGUAGE_MODEL, get_family
from seqmodels.models.family import identity
from seqmodels.models.folder import train_model
from seqmodels.training.recipes import train_language_model, train_seq2seq_model


def save_pairs(path: Path, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Store (src ids, tgt ids) pairs as flat arrays plus lengths in an .npz file."""
    srcs = [np.asarray(s, dtype=np.int32) for s, _ in pairs]
    tgts = [np.asarray(t, dtype=np.int32) for _, t in pairs]
    empty = np.zeros(0, dtype=np.int32)
    np.savez(
        path,
        src=np.concatenate(srcs) if srcs else empty,
        src_lens=np.array([len(s) for s in srcs], dtype=np.int64),
        tgt=np.concatenate(tgts) if tgts else empty,
        tgt_lens=np.array([len(t) for t in tgts], dtype=np.int64),
    )


def load_pairs(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    with np.load(path) as z:
        src = np.split(z["src"], np.cumsum(z["src_lens"])[:-1]) if len(z["src_lens"]) else []
        tgt = np.split(z["tgt"], np.cumsum(z["tgt_lens"])[:-1]) if len(z["tgt_lens"]) else []
    return list(zip(src, tgt, strict=True))


class ParsedSpec:
    """A spec's model type with its validated architecture and training settings."""

    def __init__(self, spec: dict[str, Any]):
        if "type" not in spec:
            raise ValueError(
                "a spec names its model with `type` (a registered type such as transformer_lm) "
                "and its settings with `architecture` and `training`; the old keys "
                "`arch`/`model`/`train` are no longer read"
            )
        self.type = spec["type"]
        family = get_family(self.type)
        self.family = family
        self.architecture = family.Architecture.model_validate(spec.get("architecture", {}))
        self.training = family.Training.model_validate(spec.get("training", {}))


def run_spec(spec: dict[str, Any], base: Path = Path(".")) -> dict[str, Any]:
    """Train the model a spec describes (on every rank under torchrun); returns its summary."""
    parsed = ParsedSpec(spec)
    out_dir = base / spec["out_dir"]
    metrics_file = base / spec.get("metrics_file", Path(spec["out_dir"]) / "metrics.jsonl")

    def on_metrics(metrics: dict[str, float], step: int) -> None:  # rank 0 only
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        with open(metrics_file, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    data = spec["data"]
    if "parquet" in data:
        task = next(t for t, kind in TASK_FAMILIES.items() if kind == parsed.family.task)
        spm = base / data["spm"] if "spm" in data else None
        return train_model(
            parsed, task, base / data["parquet"], spm, out_dir, on_metrics=on_metrics
        )
    return train_on_arrays(parsed, spec, base, on_metrics).summary()


def train_on_arrays(parsed: ParsedSpec, spec: dict[str, Any], base: Path, on_metrics):
    """Train from id arrays saved with np.save (LM streams) or save_pairs (seq2seq pairs)."""
    data, family, vocab_size = spec["data"], parsed.family, int(spec["vocab_size"])
    arch, out_dir = parsed.architecture, base / spec["out_dir"]
    model_identity = identity(parsed.type, arch, vocab_size)
    if family.task == LANGUAGE_MODEL:
        valid = np.load(base / data["valid"]) if data.get("valid") else np.zeros(0, np.int32)
        return train_language_model(
            lambda: family.build(arch, vocab_size),
            np.load(base / data["train"]),
            valid,
            parsed.training,
            out_dir,
            model_identity=model_identity,
            max_context=family.max_context(arch),
            on_metrics=on_metrics,
        )
    valid_pairs = load_pairs(base / data["valid"]) if data.get("valid") else []
    return train_seq2seq_model(
        lambda: family.build(arch, vocab_size),
        load_pairs(base / data["train"]),
        valid_pairs,
        parsed.training,
        out_dir,
        model_identity=model_identity,
        max_positions=family.max_positions(arch),
        on_metrics=on_metrics,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a seqmodels model (torchrun-ready).")
    parser.add_argument(
        "--spec", required=True, type=Path, nargs="+", help="JSON spec(s), trained in turn"
    )
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(asctime)s %(name)s %(levelname)s %(message)s",
    )
    for path in args.spec:  # several models share one launch (and one process group)
        summary = run_spec(json.loads(path.read_text()), base=path.resolve().parent)
        if rank == 0:
            print(json.dumps(summary, default=str), flush=True)


if __name__ == "__main__":
    main()
