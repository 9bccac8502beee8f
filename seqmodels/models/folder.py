"""A trained model is a self-contained folder; this module writes and reads it.

    seqmodels.json   {"format": 2, "type", "task", "architecture", "decoding"}: written
                     last, so a folder without it is an unfinished model
    spm.model        the SentencePiece vocabulary (families with their own tokenizer: hf/)
    model.pt | ngram.npz   the weights (the family decides which)
    model.bin, config.json, *vocabulary*   a CTranslate2 export instead (seqmodels.json then
                     names "runtime": "ctranslate2"; seqmodels.models.ct2_export)

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
from seqmodels.models.family import WEIGHTS_FILE, TrainJob
from seqmodels.training.distributed import process_rank
from seqmodels.training.trainer import MetricsCallback, ProgressCallback

META_FILE = "seqmodels.json"
FORMAT = 2
# The experiment task a folder was trained for (its metadata's "task") -> what its predictor
# is asked by default: the pyfunc's and the CLI's natural request.
NATURAL_TASKS = {
    "translation": "translate",
    "summarization": "summarize",
    "language_model": "generate",
}
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
    spm_model: Path | None,
    out_dir: Path,
    *,
    decoding: dict[str, Any] | None = None,
    on_metrics: MetricsCallback | None = None,
    on_progress: ProgressCallback | None = None,
    init_from: Path | None = None,
) -> dict[str, Any]:
    """Train one model of an experiment into `out_dir` (train split; valid for validation).

    `spm_model`: the experiment's SentencePiece model (None for a family that brings its own
    tokenizer). `init_from`: a finished model folder whose weights training starts from; it
    must hold the same type and architecture, and the same vocabulary.
    Returns the family's summary (parameters, steps, time, tokens/s, device, vocab size...).
    """
    family = get_family(spec.type)
    if spm_model is None and not family.own_tokenizer:
        raise ValueError(f"a {spec.type} model needs the experiment's SentencePiece model")
    init_weights = None
    if init_from is not None:
        init_weights = check_warm_start(Path(init_from), spec, spm_model)
    out_dir = Path(out_dir)
    # Under a launch every rank trains; rank 0 alone writes the folder.
    main = process_rank() == 0
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / META_FILE).unlink(missing_ok=True)  # unfinished until written again
        if not family.own_tokenizer:
            shutil.copyfile(spm_model, out_dir / "spm.model")
    started = time.perf_counter()
    job = TrainJob(spec.type, Path(parquet), spm_model, out_dir, on_metrics, on_progress)
    job.init_weights = init_weights
    summary = family.train(spec.architecture, spec.training, job)
    summary.setdefault("train_time_s", time.perf_counter() - started)
    if "vocab_size" not in summary:  # a family with its own tokenizer reports its own
        summary["vocab_size"] = load_sentencepiece(spm_model).vocab_size()
    meta = {
        "format": FORMAT,
        "type": spec.type,
        "task": task,
        "architecture": spec.architecture.model_dump(mode="json"),
        "decoding": {**(decoding or {}), **family.decoding_settings(spec.training)},
    }
    if main:
        atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    return summary


def model_lineage(spec: ModelSpecLike) -> dict[str, str]:
    """Lineage tags the model's family adds (a pretrained checkpoint's id, commit, digest)."""
    return get_family(spec.type).lineage(spec.architecture)


def check_warm_start(init_from: Path, spec: ModelSpecLike, spm_model: Path | None) -> Path:
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
    family = get_family(spec.type)
    (theirs, their_source), (ours, our_source) = (
        family.folder_vocabulary(init_from),
        family.vocabulary(spec.architecture, spm_model),
    )
    if theirs != ours:
        raise ValueError(
            f"init_from {init_from} was trained with the vocabulary {their_source}, which "
            f"differs from this experiment's, {our_source}: a warm start needs the same vocabulary"
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


def family_and_architecture(meta: dict[str, Any], where: Path):
    """The family of a folder's metadata and its validated architecture."""
    family = get_family(meta["type"])
    try:
        return family, family.Architecture.model_validate(meta["architecture"])
    except ValueError as exc:
        raise ValueError(f"{where}: invalid architecture: {exc}") from None


def load_predictor(model_dir: Path, device: str = "auto"):
    """The predictor (seqmodels.inference.predictors) of a finished model folder."""
    meta = read_model_meta(model_dir)
    family, arch = family_and_architecture(meta, Path(model_dir) / META_FILE)
    if meta.get("runtime") == "ctranslate2":  # a CTranslate2 export (models.ct2_export)
        from seqmodels.inference.ct2_predictors import load_ct2_predictor

        return load_ct2_predictor(
            Path(model_dir), family, arch, meta.get("decoding", {}), device=device
        )
    return family.load(Path(model_dir), arch, meta.get("decoding", {}), device)


def transformers_export(model_dir: Path) -> tuple[str, Any, dict[str, Any]] | None:
    """(task, pipeline, metadata) of a finished folder whose family is registered with
    MLflow's transformers flavor; None for the others (they use the seqmodels pyfunc)."""
    meta = read_model_meta(model_dir)
    family, arch = family_and_architecture(meta, Path(model_dir) / META_FILE)
    hf_task = family.transformers_task_for(meta.get("task", ""))
    if hf_task is None:
        return None
    pipeline = family.transformers_pipeline(
        Path(model_dir), arch, meta.get("decoding", {}), hf_task
    )
    return hf_task, pipeline, meta


def folder_from_export(folder: Path, meta: dict[str, Any], out_dir: Path) -> Path:
    """A model folder rebuilt from a model exported by `transformers_export` (the weights and
    tokenizer of its save_pretrained `folder`, the metadata logged with it), so that a
    registered Hugging Face model seeds a warm start like any other."""
    family, arch = family_and_architecture(meta, Path(folder))
    family.unpack_exported(Path(folder), arch, Path(out_dir))
    atomic_write_text(Path(out_dir) / META_FILE, json.dumps(meta, indent=2) + "\n")
    return Path(out_dir)


def load_exported_predictor(folder: Path, meta: dict[str, Any], device: str = "auto"):
    """The predictor of a model exported by `transformers_export` (its pipeline's
    save_pretrained folder and the metadata logged with it)."""
    family, arch = family_and_architecture(meta, Path(folder))
    return family.load_exported(Path(folder), arch, meta.get("decoding", {}), device)
