"""The pipeline's train stage launching a model's training on several worker processes
(`training.distributed`), on CPU with gloo: the same losses as one process at the same global
batch, checkpoints that a later launch resumes exactly (or one process resumes), a second node
that joins, a failing worker named in the error, and the config checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
from tests.launch_workers import fail_on_rank_1, killed_on_rank_1
from tests.pipeline_cli import CLI, cli_env, run_checked
from tests.servers import free_port

EXPERIMENT = "lm-dist"
MODEL = {
    "type": "transformer_lm",
    # No dropout: rank 1 draws other masks than one process would, and a resumed rank 1
    # other masks than an uninterrupted one; without it both runs must agree.
    "architecture": {
        "n_layer": 1,
        "n_head": 2,
        "d_model": 32,
        "d_ff": 64,
        "block_size": 32,
        "dropout": 0.0,
    },
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


def experiment_files(work: Path) -> tuple[Path, Path]:
    """The cleaned corpus and the vocabulary the pipeline trained the model on."""
    (parquet,) = (work / EXPERIMENT / "clean").glob("*/corpus.parquet")
    (spm,) = (work / EXPERIMENT / "vocab").glob("*/spm.model")
    return parquet, spm


def request_for(out_dir: Path, parquet: Path, spm: Path, mlflow_run: tuple[str, str]):
    """A TrainRequest of the test's model (trained in `out_dir`, metrics to `mlflow_run`:
    (tracking URI, run id))."""
    return TrainRequest(
        model_name="transformer",
        spec=parse_model_spec(MODEL).model_dump(mode="json"),
        task_kind="language_model",
        decoding={},
        parquet=str(parquet),
        spm_model=str(spm),
        out_dir=str(out_dir),
        tracking_uri=mlflow_run[0],
        run_id=mlflow_run[1],
    )


@pytest.mark.e2e
def test_two_processes_register_the_loss_curve_of_one(pipeline_run, tmp_path):
    client, run = pipeline_run["client"], pipeline_run["run"]
    model_dir = Path(run.data.tags["training_dir"])
    assert run.data.tags["distributed"] == "1x2"
    assert {META_FILE, "spm.model", "model.pt"} <= {p.name for p in model_dir.iterdir()}
    # One checkpoint file per 2 steps (rank 0 writes them; the others only read).
    assert [s for s, _ in list_checkpoints(model_dir / "checkpoints")] == [2, 4, 6, 8]
    parquet, spm = experiment_files(pipeline_run["tmp"] / "work")
    # The same folder as the model trained in one process: either resumes the other.
    single = parse_model_spec(MODEL)
    work_dir = str(pipeline_run["tmp"] / "work" / EXPERIMENT)
    assert training_dir(work_dir, "transformer", single, str(parquet), str(spm)) == model_dir

    reference: dict[int, float] = {}

    def keep_train_loss(metrics: dict[str, float], step: int) -> None:
        if "train_loss" in metrics:
            reference[step] = metrics["train_loss"]

    train_request(request_for(tmp_path / "single", parquet, spm, ("", "")), keep_train_loss, None)
    got = loss_curve(client, run.info.run_id)
    assert sorted(got) == sorted(reference) == list(range(1, 9))
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), step


@pytest.mark.e2e
def stopped_after(finished: Path, step: int, copy: Path) -> Path:
    """A copy of a finished training folder as a launch killed right after its checkpoint of
    `step` leaves it: no later checkpoint, no weights, no metadata."""
    shutil.copytree(finished, copy)
    for saved, path in list_checkpoints(copy / "checkpoints"):
        if saved > step:
            path.unlink()
    for name in (META_FILE, "model.pt"):
        (copy / name).unlink()
    return copy


def test_a_launch_stopped_after_4_steps_resumes_and_ends_like_an_uninterrupted_one(
    pipeline_run, tmp_path
):
    client, run = pipeline_run["client"], pipeline_run["run"]
    finished = Path(run.data.tags["training_dir"])
    stopped = stopped_after(finished, 4, tmp_path / "stopped")
    parquet, spm = experiment_files(pipeline_run["tmp"] / "work")
    uri = f"sqlite:///{pipeline_run['tmp'] / 'mlflow.db'}"
    resumed_run = client.create_run(run.info.experiment_id, run_name="resumed").info.run_id

    summary = launch_training(
        request_for(stopped, parquet, spm, (uri, resumed_run)),
        DistributedSettings(nproc_per_node=2),
    )
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 8
    expected = torch.load(finished / "model.pt", weights_only=True)
    got = torch.load(stopped / "model.pt", weights_only=True)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    uninterrupted = loss_curve(client, run.info.run_id)
    assert loss_curve(client, resumed_run) == {s: uninterrupted[s] for s in range(5, 9)}

    # One process continues the two processes' checkpoint too (the folder and resume key
    # ignore the process count), on the same trajectory up to float summation order.
    alone = stopped_after(finished, 4, tmp_path / "alone")
    summary = train_request(request_for(alone, parquet, spm, ("", "")), None, None)
    assert summary["resumed_from_step"] == 4
    got = torch.load(alone / "model.pt", weights_only=True)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-3, atol=1e-4)


@pytest.mark.e2e
def test_a_second_node_joins_and_the_two_train_like_one_process(pipeline_run, tmp_path):
    """Two nodes of one process each, both on this machine: node 0 launches (as the train
    task does), node 1 runs the join command and gets the training from rank 0."""
    client, run = pipeline_run["client"], pipeline_run["run"]
    endpoint = f"127.0.0.1:{free_port()}"
    two_nodes = DistributedSettings(nproc_per_node=1, nnodes=2, rdzv_endpoint=endpoint)
    join = [sys.executable, "-m", "tasks.launch", "join", "--nnodes", "2", "--node-rank", "1"]
    join += ["--nproc-per-node", "1", "--rdzv-endpoint", endpoint, "--idle-timeout-s", "5"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    node_1 = subprocess.Popen(join, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        parquet, spm = experiment_files(pipeline_run["tmp"] / "work")
        uri = f"sqlite:///{pipeline_run['tmp'] / 'mlflow.db'}"
        two_node_run = client.create_run(run.info.experiment_id, run_name="2 nodes").info.run_id
        request = request_for(tmp_path / "two-nodes", parquet, spm, (uri, two_node_run))
        summary = launch_training(request, two_nodes)
        output = node_1.communicate(timeout=120)[0].decode()
    finally:
        node_1.kill()
    assert node_1.returncode == 0 and "node 1 joined 1 training(s)" in output, output[-3000:]
    assert summary["steps"] == 8
    expected = loss_curve(client, run.info.run_id)  # 2 processes on one node
    got = loss_curve(client, two_node_run)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), step


def test_a_worker_failing_on_rank_1_fails_the_launch_with_its_rank_and_error():
    with pytest.raises(WorkerFailed) as failed:
        launch(DistributedSettings(nproc_per_node=2), fail_on_rank_1)
    assert failed.value.rank == 1 and failed.value.exception == "FloatingPointError"
    message = str(failed.value)
    assert "rank 1" in message and "FloatingPointError: loss is NaN on rank 1" in message
    assert "fail_on_rank_1" in message  # the worker's traceback


def test_a_worker_killed_on_rank_1_fails_the_launch_with_its_rank_and_signal():
    with pytest.raises(WorkerFailed) as failed:
        launch(DistributedSettings(nproc_per_node=2), killed_on_rank_1)
    assert failed.value.rank == 1 and failed.value.exception == ""
    assert "rank 1" in str(failed.value) and "SIGKILL" in str(failed.value)


@pytest.mark.parametrize(
    ("model", "error"),
    [
        (
            "ngram: {type: ngram, architecture: {order: 3}, "
            "training: {distributed: {nproc_per_node: 2}}}",
            "model 'ngram': training.distributed: a ngram model trains in one process",
        ),
        (
            "gpt: {type: hf_causal_lm, architecture: {pretrained: /nowhere}, "
            "training: {distributed: {nproc_per_node: 2}}}",
            "model 'gpt': training.distributed: a hf_causal_lm model trains in one process",
        ),
        (
            "lm: {type: transformer_lm, training: {distributed: {nproc_per_node: 0}}}",
            "models.lm (transformer_lm).training.distributed.nproc_per_node: Input should be "
            "greater than or equal to 1",
        ),
        (
            "lm: {type: transformer_lm, training: {distributed: {nnodes: 2}}}",
            "models.lm (transformer_lm).training.distributed: Value error, nnodes: 2 needs "
            "rdzv_endpoint",
        ),
        (
            "lm: {type: transformer_lm, training: {distributed: {nnodes: 2, "
            "rdzv_endpoint: node0}}}",
            "rdzv_endpoint 'node0' is not host:port",
        ),
    ],
)
def test_config_errors_name_the_file_and_the_field(tmp_path, model, error):
    models = f"    models:\n      {model}\n"
    config = write_config(tmp_path / "bad.yaml", tmp_path, {}, models=models)
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    assert str(config) in str(refused.value) and error in str(refused.value)


def test_the_process_count_is_out_of_the_config_fingerprint(tmp_path):
    one = load_config(write_config(tmp_path / "one.yaml", tmp_path, MODEL["training"]))
    training = {**MODEL["training"], "distributed": {"nproc_per_node": 8}}
    eight = load_config(write_config(tmp_path / "eight.yaml", tmp_path, training))
    assert one.fingerprint() == eight.fingerprint()
    spec = eight.experiments[EXPERIMENT].models["transformer"]
    assert without_distributed(spec) == one.experiments[EXPERIMENT].models["transformer"]
