"""Watch a growing corpus and tell Prefect when it changed: the event-driven path to a run.

`watch_corpus_flow` (deployed on an interval, see deployments/prefect.yaml) lists the
experiment's sources the way the download stage does and computes the corpus version a
pipeline run would freeze now. When it differs from the last version seen, it emits the
Prefect event `seqmodels.corpus.changed` (resource `seqmodels.experiment.<name>`, payload:
experiment, corpus_version, previous); the experiment's deployment has a trigger on that
event, so the pipeline runs once per new version instead of waiting for the nightly cron.

Decisions:

- Same digest as the pipeline. The version is over each file's (url, size, sha256), so a
  file of a trusted listing (no manifest) has to be read for its sha256. The watch therefore
  goes through the download code: a file already in the download cache is not fetched again
  (for a trusted listing: known by url, size and mtime), and a new file is fetched once, into
  the same cache, where the pipeline run it triggers finds it. Nothing is downloaded when
  nothing changed; pinned files and manifest entries are only read when the cache lacks them.
- Last version seen: a Prefect Variable per experiment and MLflow store
  (`seqmodels_corpus_<experiment>_<hash>`), written after each emission; when it does not
  exist yet, the `corpus_version` tag of the experiment's last completed pipeline run in
  MLflow. The variable is what makes it one event per version: the triggered run takes a
  while to finish, and a watch that compared with MLflow alone would emit again at every
  tick until then. A version whose triggered run fails is not announced again; the nightly
  cron deployment (or `seqmodels run`) picks it up.
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.variables import Variable

from flows.pipeline import last_completed_run
from seqmodels.config import load_config
from seqmodels.data.download import download_file
from seqmodels.data.sources import (
    EntryFiles,
    FetchedFile,
    fetch_listed,
    list_source,
    resolve_corpus,
)
from seqmodels.files import json_digest

EVENT = "seqmodels.corpus.changed"


def resource_id(experiment: str) -> str:
    """The Prefect resource an experiment's corpus events are about (what triggers match)."""
    return f"seqmodels.experiment.{experiment}"


def variable_name(experiment: str, tracking_uri: str) -> str:
    """Prefect Variable names allow lowercase letters, digits and underscores only; the
    store's hash keeps two configs that share an experiment name (smoke, default) apart."""
    slug = re.sub(r"[^a-z0-9]+", "_", experiment.lower()).strip("_")
    return f"seqmodels_corpus_{slug}_{json_digest(tracking_uri, length=8)}"


def current_version(config, experiment: str) -> str:
    """The digest of the corpus version a pipeline run of `experiment` would freeze now."""
    corpus = config.experiments[experiment].corpus
    cache = (config.work_dir / "downloads").resolve()
    mirrors = config.resolved_mirrors()
    entries = []
    for source in corpus.files:
        if not source.is_growing:
            path = download_file(
                source.url, source.sha256, cache, mirrors, storage_options=source.storage_options
            )
            entries.append(EntryFiles(source, (FetchedFile(source.url, str(path)),)))
            continue
        listing = list_source(source, cache, mirrors)
        fetched = tuple(fetch_listed(f, source, cache, mirrors) for f in listing.files)
        entries.append(EntryFiles(source, fetched, listing))
    return resolve_corpus(corpus, entries).version.digest


@flow(name="seqmodels-watch-corpus", flow_run_name="watch {experiment}")
def watch_corpus_flow(config_path: str, experiment: str) -> bool:
    """List the sources of `experiment`; emit `seqmodels.corpus.changed` when its corpus
    version differs from the last one seen. Returns whether it emitted."""
    logger = get_run_logger()
    config = load_config(config_path, [experiment])
    tracking_uri = config.resolved_tracking_uri()
    version = current_version(config, experiment)
    name = variable_name(experiment, tracking_uri)
    previous = Variable.get(name, default=None)
    if previous is None:
        run = last_completed_run(tracking_uri, experiment)
        previous = None if run is None else run.data.tags.get("corpus_version")
    if version == previous:
        logger.info("%s: corpus version %s unchanged", experiment, version)
        return False
    emit_event(
        event=EVENT,
        resource={"prefect.resource.id": resource_id(experiment)},
        payload={"experiment": experiment, "corpus_version": version, "previous": previous},
    )
    Variable.set(name, version, overwrite=True)
    logger.info("%s: corpus version %s (was %s): emitted %s", experiment, version, previous, EVENT)
    return True


if __name__ == "__main__":  # python flows/watch.py CONFIG EXPERIMENT
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(watch_corpus_flow(sys.argv[1], sys.argv[2]))
