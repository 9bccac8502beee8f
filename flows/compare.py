"""`seqmodels compare` as a Prefect flow: the comparison report becomes a Markdown artifact."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks.compare import compare_versions


@flow(name="seqmodels-compare", flow_run_name="compare-{experiment}")
def compare_flow(
    experiment: str, tracking_uri: str, out_dir: str, primary_metric: str | None = None
) -> dict:
    """Compare every registered version of `experiment`; see tasks/compare.py."""
    result = compare_versions(experiment, tracking_uri, out_dir, primary_metric)
    # Artifact keys allow lowercase letters, digits and dashes only.
    key = "".join(c if c.isalnum() else "-" for c in experiment.lower()) + "-comparison"
    create_markdown_artifact(
        key=key,
        markdown=result["markdown"]
        + f"\nFiles: `{result['files']['report']}`; MLflow run `{result['run_id']}` "
        "(artifacts under `comparison/`).\n",
        description=f"{experiment}: registered versions compared",
    )
    return result
