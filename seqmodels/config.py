"""Pipeline configuration: one YAML file, validated once, passed around as a pydantic model.

A config may start with `extends: other.yaml`; the other file is loaded first and this one is
deep-merged over it (mappings merge key by key, everything else replaces). That is how the
`gpu` profile changes model sizes without repeating the corpus definitions.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MIRROR_ENV = "SEQMODELS_MIRROR"


class _Strict(BaseModel):
    # Unknown keys are almost always typos: refuse them instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid")


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class SourceFile(_Strict):
    url: str
    sha256: str | None = None  # missing: downloaded anyway, its digest printed to pin it
    split: Literal["train", "valid", "test"] | None = None  # None: split by clean.split_method
    lang: str | None = None  # parallel text files: which side this file holds
    member: str | None = None  # zip/tar archives: the path of the corpus file inside
    # text: one segment per line. tsv: tab-separated fields, no quoting (first row is the
    # header unless `columns` names them). jsonl: one JSON object per line.
    format: Literal["text", "tsv", "jsonl"] = "text"
    # tsv/jsonl: column or key of each side, {text: ...} or {<src_lang>: ..., <tgt_lang>: ...}
    fields: dict[str, str] = {}
    columns: list[str] | None = None  # tsv without a header row: the column names, in order

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None:
            value = value.lower()
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise ValueError(f"sha256 must be 64 hex digits, got {value!r}")
        return value

    @model_validator(mode="after")
    def _format_fits(self) -> SourceFile:
        is_archive = self.url.lower().endswith(ARCHIVE_SUFFIXES)
        if is_archive and not self.member:
            raise ValueError(f"{self.url} is an archive: name the corpus file in it with `member`")
        if self.member and not is_archive:
            raise ValueError(f"{self.url}: `member` is only for zip/tar archives")
        if self.format == "text" and self.fields:
            raise ValueError(f"{self.url}: `fields` is for tsv/jsonl files")
        if self.format != "text" and not self.fields:
            raise ValueError(f"{self.url}: a {self.format} file needs `fields`")
        if self.columns is not None and self.format != "tsv":
            raise ValueError(f"{self.url}: `columns` is for tsv files")
        if self.columns is not None:
            unknown = [c for c in self.fields.values() if c not in self.columns]
            if unknown:
                raise ValueError(f"{self.url}: fields {unknown} are not in columns {self.columns}")
        return self


class CorpusConfig(_Strict):
    kind: Literal["monolingual", "parallel"]
    files: list[SourceFile] = Field(min_length=1)
    src_lang: str | None = None
    tgt_lang: str | None = None
    max_lines: int | None = Field(default=None, gt=0)  # first N lines of every file: quick runs

    @model_validator(mode="after")
    def _sides_are_named(self) -> CorpusConfig:
        if self.kind == "monolingual":
            for f in self.files:
                if f.format != "text" and set(f.fields) != {"text"}:
                    raise ValueError(f"file {f.url}: fields must be {{text: <column>}}")
            return self
        if not self.src_lang or not self.tgt_lang:
            raise ValueError("a parallel corpus needs src_lang and tgt_lang")
        sides = {self.src_lang, self.tgt_lang}
        for f in self.files:
            if f.format == "text" and f.lang not in sides:
                raise ValueError(
                    f"file {f.url}: lang must be {self.src_lang!r} or {self.tgt_lang!r}"
                )
            if f.format != "text" and set(f.fields) != sides:
                raise ValueError(f"file {f.url}: fields must name exactly {sorted(sides)}")
        # Line-aligned text files pair up per split: one file per side.
        for split in {f.split for f in self.files if f.format == "text"}:
            per_lang = [
                [
                    f
                    for f in self.files
                    if f.format == "text" and f.split == split and f.lang == lang
                ]
                for lang in (self.src_lang, self.tgt_lang)
            ]
            if [len(p) for p in per_lang] != [1, 1]:
                raise ValueError(
                    f"split {split or 'unsplit'!r}: aligned text files need exactly one "
                    f"{self.src_lang} and one {self.tgt_lang} file, got {len(per_lang[0])} "
                    f"and {len(per_lang[1])}"
                )
        return self


class CleanConfig(_Strict):
    # Normalisation, applied to every split, in this order; each counts the rows it changed.
    unicode_normalization: Literal["NFC", "NFKC"] | None = "NFC"
    unescape_html: bool = True  # &amp; &#39; &eacute; ... become the characters they name
    remove_control_chars: bool = True  # Cc become spaces; Cf (ZWSP, soft hyphen) removed
    normalize_whitespace: bool = True  # runs of whitespace become one space; ends stripped
    # Filters: a row is dropped for the first rule it fails. They apply to `filter_splits`
    # only (train by default): valid/test must stay comparable to published numbers, so they
    # lose only empty (and malformed) rows.
    filter_splits: list[Literal["train", "valid", "test"]] = ["train"]
    min_chars: int = Field(default=1, ge=1)
    max_chars: int = Field(default=1000, ge=1)
    min_words: int = Field(default=1, ge=1)
    max_words: int = Field(default=250, ge=1)
    max_length_ratio: float | None = Field(default=3.0, gt=1.0)  # parallel: longer/shorter side
    min_letter_fraction: float | None = Field(default=0.5, ge=0.0, le=1.0)  # of non-space chars
    drop_identical: bool = True  # parallel: source identical to target (copied, untranslated)
    deduplicate: bool = True  # exact duplicates within a split (the pair, for parallel data)
    remove_eval_overlap: bool = True  # train segments that also occur in valid/test
    # Sources without a split: `position` takes the first lines as train, then valid, then
    # test; `hash` assigns each line by a stable hash of (file, line number, split_seed).
    split_method: Literal["position", "hash"] = "position"
    split_seed: int = Field(default=0, ge=0)
    valid_fraction: float = Field(default=0.05, ge=0.0, lt=0.5)
    test_fraction: float = Field(default=0.05, ge=0.0, lt=0.5)
    on_malformed: Literal["error", "drop"] = "error"  # tsv/jsonl rows without their fields

    @model_validator(mode="after")
    def _bounds_are_ordered(self) -> CleanConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} > max_chars {self.max_chars}")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words {self.min_words} > max_words {self.max_words}")
        return self


class VocabConfig(_Strict):
    model_type: Literal["unigram", "bpe"] = "unigram"
    vocab_size: int = Field(default=8000, ge=16)
    character_coverage: float = Field(default=1.0, gt=0.0, le=1.0)
    max_sentences: int = Field(default=2_000_000, gt=0)  # sampled when the corpus is bigger


LM_TYPES = ("ngram", "lstm_lm", "gru_lm", "transformer_lm")
MT_TYPES = ("lstm_seq2seq", "transformer_seq2seq")


class ModelSpec(_Strict):
    type: Literal[
        "ngram", "lstm_lm", "gru_lm", "transformer_lm", "lstm_seq2seq", "transformer_seq2seq"
    ]
    architecture: dict[str, Any] = {}  # fields of the model's config dataclass (or `order`)
    training: dict[str, Any] = {}  # fields of seqmodels.training.TrainConfig


class EvaluationConfig(_Strict):
    beam_size: int = Field(default=5, ge=1)
    max_len_a: float = 1.2
    max_len_b: int = 10
    length_penalty: float = 1.0
    batch_size: int = Field(default=64, ge=1)
    sample_prompts: list[str] = ["ROMEO:"]  # LM samples logged as artefacts
    sample_tokens: int = 60
    num_samples: int = 5  # MT: translations shown as samples
    # Promotion: a challenger must beat the champion with a paired bootstrap p below this.
    significance_level: float = Field(default=0.05, gt=0.0, le=1.0)
    bootstrap_samples: int = Field(default=1000, ge=100)


class ExperimentConfig(_Strict):
    task: Literal["language_model", "translation"]
    corpus: CorpusConfig
    clean: CleanConfig = CleanConfig()
    vocab: VocabConfig = VocabConfig()
    models: dict[str, ModelSpec] = Field(min_length=1)
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _models_fit_task(self) -> ExperimentConfig:
        allowed = LM_TYPES if self.task == "language_model" else MT_TYPES
        from seqmodels.recipes import check_model_spec

        for name, spec in self.models.items():
            if spec.type not in allowed:
                raise ValueError(f"model {name!r}: type {spec.type!r} is not a {self.task} model")
            check_model_spec(name, spec)
        if (self.task == "translation") != (self.corpus.kind == "parallel"):
            raise ValueError(f"task {self.task!r} does not fit a {self.corpus.kind} corpus")
        return self

    @property
    def primary_metric(self) -> str:
        return "test_bleu" if self.task == "translation" else "test_bits_per_char"

    @property
    def higher_is_better(self) -> bool:
        return self.task == "translation"


class PipelineConfig(_Strict):
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
                for f in exp.corpus.files:
                    if f.sha256 is None:
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
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


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


def load_config(path: str | Path, only_experiments: list[str] | None = None) -> PipelineConfig:
    """Read, merge and validate a config; optionally keep only some experiments."""
    path = Path(path)
    data = _read_yaml(path)
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: invalid configuration"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    if only_experiments:
        unknown = [e for e in only_experiments if e not in config.experiments]
        if unknown:
            known = ", ".join(config.experiments)
            raise ConfigError(f"{path}: unknown experiment(s) {unknown}; known: {known}")
        config.experiments = {k: v for k, v in config.experiments.items() if k in only_experiments}
    return config
