"""Data-parallel training under torchrun, and an entry point that trains from a JSON spec.

The trainer calls `setup` itself: when torchrun's variables say WORLD_SIZE > 1 it joins the
process group (NCCL on CUDA, gloo on CPU) and wraps the model in DistributedDataParallel.
Every rank draws the same global batch and keeps its slice, rank 0 alone writes files and
reports metrics. Launch, one node or several:

    torchrun --nproc_per_node 8 -m seqmodels.distributed --spec spec.json [more.json ...]
    torchrun --nnodes 2 --node_rank 0 --rdzv_endpoint host:29500 --nproc_per_node 8 \
        -m seqmodels.distributed --spec spec.json

A spec (relative paths are resolved against the spec's folder):

    {"task": "language_model" | "translation",
     "arch": "transformer_lm" | "rnn_lm" | "lstm_seq2seq" | "transformer_seq2seq",
     "model": {...model config fields...}, "train": {...TrainConfig fields...},
     "data": {"train": "train.npy", "valid": "valid.npy"}        # LM id streams (np.save)
           | {"train": "train.npz", "valid": "valid.npz"}        # pairs (save_pairs)
           | {"parquet": "corpus.parquet", "spm": "spm.model"},  # cleaned corpus + vocab
     "out_dir": "model", "metrics_file": "metrics.jsonl"}        # metrics: optional
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        # One group per process, reused by later trainings (recipes train several models).
        atexit.register(_destroy_group)
    return DistContext(rank, world, local_rank), device


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (float64, so token counts stay exact)."""
    if ctx.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_float(value: float, ctx: DistContext, device: torch.device) -> float:
    """Rank 0's value on every rank."""
    if ctx.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def barrier(ctx: DistContext) -> None:
    if ctx.world > 1:
        dist.barrier()


# --- the torchrun entry point ------------------------------------------------------------


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


def _load_data(spec: dict[str, Any], base: Path) -> tuple[Any, Any]:
    data = spec["data"]
    task = spec["task"]
    if "parquet" in data:
        from seqmodels.data import encode_lines, language_model_stream, read_split
        from seqmodels.vocab import load_sentencepiece

        parquet = base / data["parquet"]
        sp = load_sentencepiece(base / data["spm"])
        if task == "language_model":
            return tuple(
                language_model_stream(encode_lines(sp, read_split(parquet, s, ["text"])["text"]))
                for s in ("train", "valid")
            )

        def pairs(split: str) -> list[tuple[np.ndarray, np.ndarray]]:
            rows = read_split(parquet, split, ["src", "tgt"])
            return list(
                zip(encode_lines(sp, rows["src"]), encode_lines(sp, rows["tgt"]), strict=True)
            )

        return pairs("train"), pairs("valid")
    if task == "language_model":
        valid = np.load(base / data["valid"]) if data.get("valid") else np.zeros(0, np.int32)
        return np.load(base / data["train"]), valid
    valid_pairs = load_pairs(base / data["valid"]) if data.get("valid") else []
    return load_pairs(base / data["train"]), valid_pairs


def run_spec(spec: dict[str, Any], base: Path = Path(".")):
    """Train the model a spec describes (on every rank under torchrun); returns TrainResult."""
    from seqmodels.training import ARCHS, TrainConfig, train_language_model, train_translation_model

    cfg_cls, _ = ARCHS[spec["arch"]]
    model_config = cfg_cls(**spec.get("model", {}))
    cfg = TrainConfig(**spec.get("train", {}))
    out_dir = base / spec["out_dir"]
    metrics_file = base / spec.get("metrics_file", Path(spec["out_dir"]) / "metrics.jsonl")
    train, valid = _load_data(spec, base)

    def on_metrics(metrics: dict[str, float], step: int) -> None:  # rank 0 only
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        with open(metrics_file, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    train_fn = train_language_model if spec["task"] == "language_model" else train_translation_model
    return train_fn(model_config, train, valid, cfg, out_dir, on_metrics=on_metrics)


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
        result = run_spec(json.loads(path.read_text()), base=path.resolve().parent)
        if rank == 0:
            summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items()}
            print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
