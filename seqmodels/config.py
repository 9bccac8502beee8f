"""Pipeline configuration: one YAML file, validated once, passed around as a pydantic model.

A config may start with `extends: other.yaml`; the other file is loaded first and this one is
deep-merged over it (mappings merge key by key, everything else replaces). That is how the
`gpu` profile changes model sizes without repeating the corpus definitions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BeforeValidator,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)

from seqmodels.data.settings import (  # noqa: F401  (part of the config's public names)
    ARCHIVE_SUFFIXES,
    CleanConfig,
    CorpusConfig,
    SourceFile,
    VocabConfig,
)
from seqmodels.files import json_digest
from seqmodels.models import FAMILIES, LANGUAGE_MODEL, SEQUENCE_TO_SEQUENCE
from seqmodels.settings import Settings

MIRROR_ENV = "SEQMODELS_MIRROR"


# A bare version number may be written as a YAML number (`init_from: 3`).
InitFrom = Annotated[str | None, BeforeValidator(lambda v: str(v) if type(v) is int else v)]


def _default(settings: type[Settings]) -> Any:
    """The settings' defaults, or `...` (required) when a field has none (e.g. the checkpoint
    a pretrained model starts from)."""
    if any(field.is_required() for field in settings.model_fields.values()):
        return ...
    return settings()


def _model_spec_type():
    """ModelSpec: one pydantic model per registered family, told apart by `type`. Its
    `architecture` and `training` are that family's typed settings, so a wrong key or a value
    of the wrong type is an error naming the model and the field before any stage runs."""
    specs = []
    for name, family in FAMILIES.items():
        specs.append(
            create_model(
                f"ModelSpec[{name}]",
                __base__=Settings,
                type=(Literal[name], ...),
                architecture=(family.Architecture, _default(family.Architecture)),
                training=(family.Training, family.Training()),
                # Start from another model's weights: models:/NAME@ALIAS, models:/NAME/N,
                # runs:/ID/model, or a version number of this experiment's registered model.
                init_from=(InitFrom, None),
            )
        )
    return Annotated[Union[tuple(specs)], Field(discriminator="type")]  # noqa: UP007


ModelSpec = _model_spec_type()
_MODEL_SPEC = TypeAdapter(ModelSpec)


def parse_model_spec(data: dict[str, Any]):
    """One model's settings ({type, architecture, training, init_from}) as a ModelSpec."""
    return _MODEL_SPEC.validate_python(data)


def without_distributed(spec: ModelSpec) -> ModelSpec:
    """`spec` with no training.distributed: how many processes train a model changes neither
    its folder, its resume key nor the cache keys, so 1 or 8 GPUs continue each other."""
    if getattr(spec.training, "distributed", None) is None:
        return spec
    training = spec.training.model_copy(update={"distributed": None})
    return spec.model_copy(update={"training": training})


# The experiment task -> the kind of family it trains.
TASK_FAMILIES = {
    "language_model": LANGUAGE_MODEL,
    "translation": SEQUENCE_TO_SEQUENCE,
    "summarization": SEQUENCE_TO_SEQUENCE,
}
# Tasks that read a parallel corpus (src -> tgt) and decode with beam search.
SEQ2SEQ_TASKS = ("translation", "summarization")


def check_distributed(name: str, spec: ModelSpec) -> None:
    """A ValueError naming the model when its family cannot train on several processes."""
    if getattr(spec.training, "distributed", None) is None:
        return
    if not FAMILIES[spec.type].distributed_training:
        raise ValueError(
            f"model {name!r}: training.distributed: a {spec.type} model trains in one process "
            "(only the seqmodels neural families launch several)"
        )


class EvaluationConfig(Settings):
    # Decoding of sequence-to-sequence models: beam search (greedy with beam_size 1); output
    # at most max_len_a * source tokens + max_len_b tokens (a summary: max_len_a 0, a fixed
    # max_len_b), at least min_len; GNMT length penalty alpha; no n-gram of this size twice.
    beam_size: int = Field(default=5, ge=1)
    max_len_a: float = Field(default=1.2, ge=0.0)
    max_len_b: int = Field(default=10, ge=0)
    min_len: int = Field(default=0, ge=0)
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = Field(default=0, ge=0)  # 0: off
    batch_size: int = Field(default=64, ge=1)
    sample_prompts: list[str] = ["ROMEO:"]  # LM samples logged as artefacts
    sample_tokens: int = 60
    num_samples: int = 5  # MT: translations shown as samples
    # Promotion: a challenger must beat the champion with a paired bootstrap p below this.
    significance_level: float = Field(default=0.05, gt=0.0, le=1.0)
    bootstrap_samples: int = Field(default=1000, ge=100)
    # Summarisation: the ROUGE F1 (single reference) promotion decides by, and the lead
    # baseline (the first N words of the source) scored beside the models; None: no baseline.
    rouge_metric: Literal["rouge1", "rouge2", "rougeL", "rougeLsum"] = "rougeL"
    lead_words: int | None = Field(default=None, gt=0)


class ExperimentConfig(Settings):
    task: Literal["language_model", "translation", "summarization"]
    corpus: CorpusConfig
    clean: CleanConfig = CleanConfig()
    vocab: VocabConfig = VocabConfig()
    models: dict[str, ModelSpec] = Field(min_length=1)
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _models_fit_task(self) -> ExperimentConfig:
        for name, spec in self.models.items():
            family = FAMILIES[spec.type]
            if family.task != TASK_FAMILIES[self.task]:
                raise ValueError(f"model {name!r}: type {spec.type!r} is not a {self.task} model")
            if spec.init_from is not None and not family.warm_start:
                raise ValueError(
                    f"model {name!r}: a {spec.type} model cannot start from another model's "
                    "weights (init_from)"
                )
            if getattr(spec.training, "train_from", "scratch") == "champion":
                if not family.warm_start:
                    raise ValueError(
                        f"model {name!r}: a {spec.type} model cannot continue the champion "
                        "(train_from: champion)"
                    )
                if spec.init_from is not None:
                    raise ValueError(
                        f"model {name!r}: train_from: champion and init_from both say where "
                        "training starts: keep one"
                    )
            check_distributed(name, spec)
            try:
                family.preflight(spec.architecture)
            except ValueError as exc:
                raise ValueError(f"model {name!r}: {exc}") from None
        if (self.task in SEQ2SEQ_TASKS) != (self.corpus.kind == "parallel"):
            raise ValueError(f"task {self.task!r} does not fit a {self.corpus.kind} corpus")
        if self.evaluation.lead_words is not None and self.task != "summarization":
            raise ValueError("evaluation.lead_words: the lead baseline is for summarization")
        scored = {FAMILIES[spec.type].metric_prefix: spec.type for spec in self.models.values()}
        if len(scored) > 1:
            raise ValueError(
                "models scored by pseudo-log-likelihood (" + scored.get("pll_", "") + ") are "
                "not comparable with causal language models (" + scored.get("", "") + "): "
                "put them in an experiment of their own"
            )
        return self

    @property
    def primary_metric(self) -> str:
        """What promotion decides by: BLEU, ROUGE F1 (evaluation.rouge_metric) or bits per
        character (a masked LM's pseudo-log-likelihood one, test_pll_bits_per_char, for an
        experiment of masked LMs)."""
        if self.task == "translation":
            return "test_bleu"
        if self.task == "summarization":
            return f"test_{self.evaluation.rouge_metric}"
        prefix = FAMILIES[next(iter(self.models.values())).type].metric_prefix
        return f"test_{prefix}bits_per_char"

    @property
    def needs_sentencepiece(self) -> bool:
        """False when every model brings its own tokenizer (pretrained checkpoints): the
        vocab stage is then skipped."""
        return any(not FAMILIES[spec.type].own_tokenizer for spec in self.models.values())

    @property
    def higher_is_better(self) -> bool:
        return self.task in SEQ2SEQ_TASKS

    @property
    def text_columns(self) -> list[str]:
        """The Parquet columns the models read (and the vocabulary is trained on)."""
        return ["src", "tgt"] if self.task in SEQ2SEQ_TASKS else ["text"]


class PipelineConfig(Settings):
    work_dir: Path = Path("runs")  # download cache, Parquet, vocabularies, checkpoints
    mirrors: list[str] = []  # folders or http(s) URLs with the HOST/PATH layout
    mlflow_tracking_uri: str = "sqlite:///runs/mlflow.db"
    # Scheduled pipelines should refuse a corpus file whose content is not pinned; an ad-hoc
    # run may allow it (the digest is then printed and recorded so it can be pinned).
    require_checksums: bool = False
    experiments: dict[str, ExperimentConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _checksums_pinned(self) -> PipelineConfig:
        if self.require_checksums:
            for name, exp in self.experiments.items():
                for i, f in enumerate(exp.corpus.files):
                    if f.is_growing and f.listing != "manifest" and not f.trust_listing:
                        # A listing carries no digests: say how to get them, or to do without.
                        raise ValueError(
                            f"experiments.{name}.corpus.files.{i}: {f.url}: trust_listing: a "
                            "growing entry without a manifest has no sha256 to check "
                            "(require_checksums is on); add `manifest: true` (a listing of "
                            "files with their sha256) or `trust_listing: true`"
                        )
                    if f.sha256 is None and not f.is_growing:
                        raise ValueError(
                            f"experiments.{name}.corpus.files: {f.url} has no sha256 "
                            "(require_checksums is on)"
                        )
        return self

    def resolved_mirrors(self) -> list[str]:
        """SEQMODELS_MIRROR (comma-separated) comes first, then the config's list."""
        from_env = [m.strip() for m in os.environ.get(MIRROR_ENV, "").split(",") if m.strip()]
        return from_env + [m for m in self.mirrors if m not in from_env]

    def resolved_tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI wins; a relative sqlite path is made absolute."""
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.mlflow_tracking_uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
            uri = prefix + str(Path(uri[len(prefix) :]).resolve())
        return uri

    def fingerprint(self) -> str:
        """Short hash of the resolved config: tags runs so equal configs are recognisable."""
        experiments = {
            name: exp.model_copy(
                update={"models": {m: without_distributed(s) for m, s in exp.models.items()}}
            )
            for name, exp in self.experiments.items()
        }
        resolved = self.model_copy(update={"experiments": experiments})
        return json_digest(resolved.model_dump(mode="json"), length=12)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field."""


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `extends` forms a cycle")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return _deep_merge(_read_yaml(path.parent / parent, (*seen, path)), data)


def field_path(loc: tuple) -> str:
    """A pydantic error location as a config path; a model's type (the union tag pydantic
    adds) is shown beside its name: experiments.lm.models.big (transformer_lm).training.lr"""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if i >= 2 and loc[i - 2] == "models" and item in FAMILIES:
            parts[-1] += f" ({item})"
        else:
            parts.append(str(item))
    return ".".join(parts)


def load_config(path: str | Path, only_experiments: list[str] | None = None) -> PipelineConfig:
    """Read, merge and validate a config; optionally keep only some experiments."""
    path = Path(path)
    data = _read_yaml(path)
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: invalid configuration"]
        for err in exc.errors():
            lines.append(f"  {field_path(err['loc'])}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    if only_experiments:
        unknown = [e for e in only_experiments if e not in config.experiments]
        if unknown:
            known = ", ".join(config.experiments)
            raise ConfigError(f"{path}: unknown experiment(s) {unknown}; known: {known}")
        config.experiments = {k: v for k, v in config.experiments.items() if k in only_experiments}
    return config
