"""The event-driven path: the watch flow emits `seqmodels.corpus.changed` once per new corpus
version (Prefect's asserting events client records what it emits), and prefect.yaml triggers
the experiment's deployment on that event. A real server and worker are not started here."""

from __future__ import annotations

import yaml
from prefect.testing.fixtures import asserting_events_worker  # noqa: F401  (a fixture)

from tests.conftest import REPO
from tests.test_corpus_updates import (  # noqa: F401  (store: a fixture)
    NGRAM,
    sentences,
    store,
    write_config,
    write_rows,
)

EVENT = "seqmodels.corpus.changed"


def emitted(worker) -> list:
    worker.wait_until_empty()  # (drain() would stop the worker for the rest of the test)
    return [e for e in worker._client.events if e.event == EVENT]


def test_the_watch_emits_once_per_new_corpus_version(
    tmp_path,
    store,  # noqa: F811
    asserting_events_worker,  # noqa: F811
):
    from flows.watch import watch_corpus_flow

    incoming = tmp_path / "incoming"
    write_rows(incoming, "part-1.jsonl", sentences(1, 20))
    config = str(write_config(tmp_path, NGRAM))

    # Never seen: the first version is announced.
    assert watch_corpus_flow(config, "grow") is True
    (first,) = emitted(asserting_events_worker)
    assert first.resource.id == "seqmodels.experiment.grow"
    assert first.payload["experiment"] == "grow"
    assert first.payload["previous"] is None
    version = first.payload["corpus_version"]
    assert len(version) == 16

    # Nothing new: no event, however often it looks.
    assert watch_corpus_flow(config, "grow") is False
    assert watch_corpus_flow(config, "grow") is False
    assert len(emitted(asserting_events_worker)) == 1

    # A file lands (and one still being written, left for later): one event, naming both.
    write_rows(incoming, "part-2.jsonl", sentences(2, 10))
    write_rows(incoming, "part-3.jsonl", sentences(3, 10), age=0.0)
    assert watch_corpus_flow(config, "grow") is True
    assert watch_corpus_flow(config, "grow") is False
    events = emitted(asserting_events_worker)
    assert len(events) == 2
    assert events[1].payload["previous"] == version
    assert events[1].payload["corpus_version"] not in (None, version)


def test_before_its_first_event_the_watch_compares_with_the_last_completed_run(
    tmp_path,
    store,  # noqa: F811
):
    """The version a pipeline run froze is what the watch computes (same digest), so after a
    completed run the watch stays quiet until a file lands."""
    from flows.pipeline import pipeline_flow
    from flows.watch import current_version, watch_corpus_flow
    from seqmodels.config import load_config

    write_rows(tmp_path / "incoming", "part-1.jsonl", sentences(1, 60))
    path = write_config(tmp_path, NGRAM)
    pipeline_flow(str(path))
    exp = store.get_experiment_by_name("grow")
    (run,) = store.search_runs([exp.experiment_id], "tags.stage = 'pipeline'")
    assert current_version(load_config(path), "grow") == run.data.tags["corpus_version"]
    assert watch_corpus_flow(str(path), "grow") is False
    write_rows(tmp_path / "incoming", "part-2.jsonl", sentences(2, 10))
    assert watch_corpus_flow(str(path), "grow") is True


def test_prefect_yaml_triggers_each_experiment_on_its_corpus_event():
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    for experiment in ("lm-shakespeare", "mt-multi30k-de-en"):
        nightly = deployments[f"nightly-{experiment}"]
        assert nightly["schedules"][0]["cron"]  # the cron stays
        (trigger,) = [DeploymentEventTrigger(**t) for t in nightly["triggers"]]
        assert trigger.enabled
        assert trigger.expect == {EVENT}
        assert trigger.match.model_dump() == {
            "prefect.resource.id": f"seqmodels.experiment.{experiment}"
        }
        assert trigger.parameters["experiments"] == [experiment]
        # One run at a time; an event during a run waits instead of being dropped.
        assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}

        watch = deployments[f"watch-{experiment}"]
        assert watch["entrypoint"] == "flows/watch.py:watch_corpus_flow"
        assert watch["parameters"] == {
            "config_path": "configs/default.yaml",
            "experiment": experiment,
        }
        assert watch["schedules"][0]["interval"] > 0


def test_serve_builds_every_deployment_of_prefect_yaml_with_its_triggers():
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve", REPO / "deployments" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    built = {d.name: d for d in serve.deployments_from_yaml(REPO / "deployments/prefect.yaml")}
    assert [t.expect for t in built["nightly-lm-shakespeare"].triggers] == [{EVENT}]
    assert built["watch-lm-shakespeare"].entrypoint.endswith("flows/watch.py:watch_corpus_flow")
