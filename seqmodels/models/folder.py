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

from seqmodels.files import atomic_write_text, load_sentencepiece
from seqmodels.models import get_family
from seqmodels.models.family import TrainJob
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
) -> dict[str, Any]:
    """Train one model of an experiment into `out_dir` (train split; valid for validation).

    Returns the family's summary (parameters, steps, time, tokens/s, device, vocab size...).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)  # unfinished until written again
    family = get_family(spec.type)
    shutil.copyfile(spm_model, out_dir / "spm.model")
    started = time.perf_counter()
    job = TrainJob(spec.type, Path(parquet), Path(spm_model), out_dir, on_metrics, on_progress)
    summary = family.train(spec.architecture, spec.training, job)
    summary.setdefault("train_time_s", time.perf_counter() - started)
    summary["vocab_size"] = load_sentencepiece(spm_model).vocab_size()
    meta = {
        "format": FORMAT,
        "type": spec.type,
        "task": task,
        "architecture": spec.architecture.model_dump(mode="json"),
        "decoding": decoding or {},
    }
    atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    return summary


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
