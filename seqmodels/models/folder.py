"""A trained model is a self-contained folder; this module writes and reads it.

    seqmodels.json   {"format": 2, "type", "task", "architecture", "decoding"}: written
                     last, so a folder without it is an unfinished model
    spm.model        the SentencePiece vocabulary
    model.pt | ngram.npz   the weights (the family decides which)

Folders written before format 2 have no "architecture" in seqmodels.json; their settings are
in model_config.json ({"arch": ..., "config": {...}}), which `read_model_meta` still reads.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

from seqmodels.files import atomic_write_text, file_sha256, load_sentencepiece
from seqmodels.models import get_family
from seqmodels.models.family import WEIGHTS_FILE, TrainJob
from seqmodels.training.trainer import MetricsCallback, ProgressCallback

META_FILE = "seqmodels.json"
FORMAT = 2
LEGACY_CONFIG_FILE = "model_config.json"
# Keys of format-1 model_config.json that are not architecture settings any more: the
# vocabulary size comes from spm.model and the recurrent cell from the model type.
LEGACY_DERIVED_KEYS = ("vocab_size", "cell")


class ModelSpecLike(Protocol):
    type: str
    architecture: Any  # the family's Architecture settings
    training: Any  # the family's Training settings


def train_model(
    spec: ModelSpecLike,
    task: str,
    parquet: Path,
    spm_model: Path,
    out_dir: Path,
    decoding: dict[str, Any] | None = None,
    *,
    on_metrics: MetricsCallback | None = None,
    on_progress: ProgressCallback | None = None,
    init_from: Path | None = None,
) -> dict[str, Any]:
    """Train one model of an experiment into `out_dir` (train split; valid for validation).

    `init_from`: a finished model folder whose weights training starts from; it must hold
    the same type and architecture, and the same vocabulary as `spm_model`.
    Returns the family's summary (parameters, steps, time, tokens/s, device, vocab size...).
    """
    family = get_family(spec.type)
    init_weights = None
    if init_from is not None:
        init_weights = check_warm_start(Path(init_from), spec, Path(spm_model))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)  # unfinished until written again
    shutil.copyfile(spm_model, out_dir / "spm.model")
    started = time.perf_counter()
    job = TrainJob(spec.type, Path(parquet), Path(spm_model), out_dir, on_metrics, on_progress)
    job.init_weights = init_weights
    summary = family.train(spec.architecture, spec.training, job)
    summary.setdefault("train_time_s", time.perf_counter() - started)
    # A family with its own tokenizer reports its vocabulary; the others use spm_model's.
    summary.setdefault("vocab_size", load_sentencepiece(spm_model).vocab_size())
    meta = {
        "format": FORMAT,
        "type": spec.type,
        "task": task,
        "architecture": spec.architecture.model_dump(mode="json"),
        "decoding": decoding or {},
    }
    atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    return summary


def model_lineage(spec: ModelSpecLike) -> dict[str, str]:
    """Lineage tags the model's family adds (a pretrained checkpoint's id, commit, digest)."""
    return get_family(spec.type).lineage(spec.architecture)


def check_warm_start(init_from: Path, spec: ModelSpecLike, spm_model: Path) -> Path:
    """The weights file of `init_from` if its model can seed `spec`; a ValueError naming both
    when the type, the architecture or the vocabulary differs."""
    if not get_family(spec.type).warm_start:
        raise ValueError(f"a {spec.type} model cannot start from another model's weights")
    meta = read_model_meta(init_from)
    ours = spec.architecture.model_dump(mode="json")
    theirs = get_family(meta["type"]).Architecture.model_validate(meta["architecture"])
    theirs = theirs.model_dump(mode="json")
    if meta["type"] != spec.type or theirs != ours:
        raise ValueError(
            f"init_from {init_from} holds a {meta['type']} model with architecture {theirs}; "
            f"this model is a {spec.type} with architecture {ours}: they must match"
        )
    vocab = init_from / "spm.model"
    if file_sha256(vocab) != file_sha256(spm_model):
        raise ValueError(
            f"init_from {init_from} was trained with the vocabulary {vocab}, which differs from "
            f"this experiment's {spm_model}: a warm start needs the same vocabulary"
        )
    weights = init_from / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"init_from {init_from} has no {WEIGHTS_FILE}")
    return weights


def read_model_meta(model_dir: Path) -> dict[str, Any]:
    """seqmodels.json of a finished folder, with "architecture" filled in for old folders."""
    model_dir = Path(model_dir)
    meta_path = model_dir / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{model_dir} is not a finished seqmodels model (no {META_FILE})")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if "architecture" not in meta:
        legacy = model_dir / LEGACY_CONFIG_FILE
        config = json.loads(legacy.read_text())["config"] if legacy.exists() else {}
        meta["architecture"] = {
            k: v for k, v in config.items() if k not in LEGACY_DERIVED_KEYS
        }  # n-gram folders had no model_config.json: their order is in ngram.npz
    return meta


def load_predictor(model_dir: Path, device: str = "auto"):
    """The predictor (seqmodels.inference.predictors) of a finished model folder."""
    meta = read_model_meta(model_dir)
    family = get_family(meta["type"])
    try:
        arch = family.Architecture.model_validate(meta["architecture"])
    except ValueError as exc:
        raise ValueError(f"{Path(model_dir) / META_FILE}: invalid architecture: {exc}") from None
    return family.load(Path(model_dir), arch, meta.get("decoding", {}), device)
