"""Serve the deployments of deployments/prefect.yaml from this one process: no work pool, no
worker. Each run executes in a subprocess of this script, in the repository root.

    PREFECT_API_URL=http://127.0.0.1:4200/api python deployments/serve.py

The schedules, event triggers, parameters and concurrency limits are read from prefect.yaml,
so the two ways of running them cannot drift apart. Stop with Ctrl-C: the deployments stay
registered, and serve pauses them as it exits so that no run waits for a process that is gone.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml
from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.schedules import Cron, Interval

REPO = Path(__file__).resolve().parent.parent


def deployments_from_yaml(path: Path) -> list:
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from flows.pipeline import pipeline_flow
    from flows.watch import watch_corpus_flow

    flows = {
        "flows/pipeline.py:pipeline_flow": pipeline_flow,
        "flows/watch.py:watch_corpus_flow": watch_corpus_flow,
    }
    spec = yaml.safe_load(path.read_text())
    deployments = []
    for d in spec["deployments"]:
        assert d["entrypoint"] in flows, d["entrypoint"]
        limit = d.get("concurrency_limit")
        schedules = [
            Cron(s["cron"], timezone=s.get("timezone"))
            if "cron" in s
            else Interval(s["interval"], timezone=s.get("timezone"))
            for s in d.get("schedules", [])
        ]
        deployments.append(
            flows[d["entrypoint"]].to_deployment(
                name=d["name"],
                description=d.get("description"),
                tags=d.get("tags"),
                parameters=d.get("parameters"),
                schedules=schedules,
                triggers=[DeploymentEventTrigger(**t) for t in d.get("triggers", [])],
                concurrency_limit=ConcurrencyLimitConfig(**limit) if limit else None,
            )
        )
    return deployments


if __name__ == "__main__":
    # Config paths in the parameters are relative to the repository root.
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    serve(*deployments_from_yaml(REPO / "deployments" / "prefect.yaml"))
