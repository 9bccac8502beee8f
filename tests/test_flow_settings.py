"""Operational settings every Prefect task and flow of the pipeline must carry."""

from __future__ import annotations

import importlib

from prefect import Flow, Task

import flows.stages
from flows.pipeline import experiment_flow, pipeline_flow


def _objects(kind):
    for module in (
        "tasks.data",
        "tasks.modeling",
        "tasks.registry",
        "tasks.promotion",
        "tasks.compare",
    ):
        for value in vars(importlib.import_module(module)).values():
            if isinstance(value, kind):
                yield value


def test_every_task_has_a_timeout():
    tasks = list(_objects(Task))
    assert {t.name for t in tasks} >= {
        "download",
        "clean",
        "vocab",
        "train",
        "evaluate",
        "register",
        "promote",
    }
    for t in tasks:
        assert t.timeout_seconds, f"task {t.name} has no timeout"


def test_pipeline_has_a_subflow_per_stage_with_named_runs():
    stages = [v for v in vars(flows.stages).values() if isinstance(v, Flow)]
    assert {f.name for f in stages} == {"download", "clean", "vocab", "train", "evaluate-register"}
    for f in [*stages, experiment_flow]:
        assert "{experiment}" in f.flow_run_name
    assert "{config_path}" in experiment_flow.flow_run_name
    assert pipeline_flow.should_validate_parameters


def test_the_config_is_read_once_per_run_and_passed_on_as_a_value():
    # The experiment subflow and the stages get the validated config, never a path to read.
    import inspect

    from seqmodels.config import PipelineConfig

    assert inspect.signature(experiment_flow.fn).parameters["config"].annotation in (
        PipelineConfig,
        "PipelineConfig",
    )
    for f in [experiment_flow, *(v for v in vars(flows.stages).values() if isinstance(v, Flow))]:
        assert "load_config" not in inspect.getsource(f.fn), f.name
    # The CLI validates before Prefect starts and hands the same object to the flow.
    assert "config=validated" in inspect.getsource(importlib.import_module("flows.cli").run)
