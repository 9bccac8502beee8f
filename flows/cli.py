"""`seqmodels` command line: run the pipeline and print what it produced."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, help="Corpus URL to an evaluated, registered model.")
# A fixed width when not on a terminal, so piped/logged tables are not squeezed to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
DEFAULT_CONFIG = Path("configs/default.yaml")

# Metrics shown in the summary table, in this order, when a model has them.
SHOWN_METRICS = (
    "test_bits_per_char",
    "test_ppl_per_word",
    "test_ppl_per_token",
    "test_bleu",
    "test_chrf",
)


@app.callback()
def main() -> None:
    """seqmodels: corpus URL to an evaluated, registered language or translation model."""


def _quiet_telemetry() -> None:
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }.items():
        os.environ.setdefault(key, value)


def results_table(rows: list[dict]) -> Table:
    table = Table(title="seqmodels results")
    for column in ("experiment", "model", "metrics", "MLflow run id", "version", "champion"):
        table.add_column(column)
    for row in rows:
        metrics = "  ".join(
            f"{name.removeprefix('test_')}={row['metrics'][name]:.3f}"
            for name in SHOWN_METRICS
            if name in row["metrics"]
        )
        table.add_row(
            row["experiment"],
            row["model"],
            metrics,
            row["run_id"],
            row["version"],
            "champion" if row["champion"] else "",
        )
    return table


@app.command()
def run(
    config: Path = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="Pipeline config (YAML)."),
    experiment: list[str] = typer.Option(
        None, "--experiment", "-e", help="Only these experiments."
    ),
    refresh_cache: bool = typer.Option(False, help="Ignore cached download/clean/vocab results."),
) -> None:
    """Run the pipeline: download, clean, vocab, train, evaluate, register."""
    _quiet_telemetry()
    from seqmodels.config import ConfigError, load_config

    try:
        load_config(config, experiment or None)  # fail fast, before Prefect starts
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    from flows.pipeline import pipeline_flow

    started = time.perf_counter()
    rows = pipeline_flow(str(config), experiment or None, refresh_cache)
    console.print(results_table(rows))
    console.print(f"wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    app()
