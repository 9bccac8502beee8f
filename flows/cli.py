"""`seqmodels` command line: run the pipeline and print what it produced."""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, help="Corpus URL to an evaluated, registered model.")
# A fixed width when not on a terminal, so piped/logged tables are not squeezed to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
# Messages and summaries go to stderr so that stdout holds only the outputs, one per line.
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
DEFAULT_CONFIG = Path("configs/default.yaml")
MT_MODEL = "models:/mt-multi30k-de-en@champion"
LM_MODEL = "models:/lm-shakespeare@champion"
SUM_MODEL = "models:/sum-aeslc@champion"
CHUNK_LINES = 256  # lines per predict call: outputs stream out while a long input is read

# Metrics shown in the summary table, in this order, when a model has them.
SHOWN_METRICS = (
    "test_bits_per_char",
    "test_ppl_per_word",
    "test_ppl_per_token",
    "test_bleu",
    "test_chrf",
    "test_rouge1",
    "test_rouge2",
    "test_rougeL",
)


@app.callback()
def main() -> None:
    """seqmodels: corpus URL to an evaluated, registered language, translation or
    summarisation model."""


def _quiet_telemetry() -> None:
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # A loaded machine can take longer than Prefect's default 20 s to start the local API.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
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
            row["version"] or "baseline",
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
    force: bool = typer.Option(
        False, help="Train even when nothing changed since the last completed run."
    ),
) -> None:
    """Run the pipeline: download, clean, vocab, train, evaluate, register."""
    _quiet_telemetry()
    from seqmodels.config import ConfigError, load_config

    try:
        validated = load_config(config, experiment or None)  # fail fast, before Prefect starts
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    from flows.pipeline import pipeline_flow

    started = time.perf_counter()
    rows = pipeline_flow(
        str(config), experiment or None, refresh_cache, config=validated, force=force
    )
    console.print(results_table(rows))
    console.print(f"wall time: {time.perf_counter() - started:.0f} s")


# --- using registered models ----------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    err_console.print(f"[red]{escape(message)}[/red]")
    raise typer.Exit(2)


def _tracking_uri(tracking_uri: str | None, config: Path) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the config's mlflow_tracking_uri."""
    from seqmodels.config import ConfigError, load_config

    if tracking_uri is None:
        try:
            return load_config(config).resolved_tracking_uri()  # MLFLOW_TRACKING_URI wins there
        except ConfigError as exc:
            _fail(f"{exc}\n(or give --tracking-uri / set MLFLOW_TRACKING_URI)")
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not tracking_uri[len(prefix) :].startswith("/"):
        tracking_uri = prefix + str(Path(tracking_uri[len(prefix) :]).resolve())
    return tracking_uri


def _check_store(tracking_uri: str) -> None:
    # MLflow would silently create an empty SQLite store; reading from one is always a mistake.
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not Path(tracking_uri[len(prefix) :]).is_file():
        _fail(f"no MLflow database at {tracking_uri}: run `seqmodels run` or give --tracking-uri")


def _load_model(model_uri: str, tracking_uri: str, natural_task: str):
    """The pyfunc behind `model_uri`; exits 2 when it is missing or of another kind
    (`natural_task`: "translate", "summarize" or "generate", see NATURAL_TASKS)."""
    _quiet_telemetry()
    _check_store(tracking_uri)
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    # Versions registered before the pyfunc had type hints make MLflow print its hint to model
    # authors ("add type hints to predict") on every load and predict: noise to a user. It is
    # raised under MLflow's own warning filters, so it is dropped where it is shown.
    hint = "type hints to the `predict` method"
    show = warnings.showwarning

    def show_others(message, *args, **kwargs) -> None:
        if hint not in str(message):
            show(message, *args, **kwargs)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_others
            info = mlflow.models.get_model_info(model_uri)
            if "transformers" in info.flavors:
                return _load_transformers_model(model_uri, info, natural_task)
            model = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        reason = getattr(exc, "message", None) or str(exc)
        _fail(f"cannot load model {model_uri} from {tracking_uri}: {reason}")
    warnings.filterwarnings("ignore", message=f".*{hint}")  # and on every predict
    # The signature's default `task` is the model's natural one (see tasks/registry.py).
    schema = model.metadata.get_params_schema()
    default = {p.name: p.default for p in schema.params}.get("task") if schema else None
    if default is not None:
        _check_natural_task(model_uri, default, natural_task)
    return model


def _load_transformers_model(model_uri: str, info, natural_task: str):
    """A fine-tuned Hugging Face model (transformers flavor) behind the seqmodels pyfunc's
    interface, so that `score` works on it too: its predictor is rebuilt from the logged
    pipeline's files and the seqmodels metadata logged with them."""
    import mlflow

    from seqmodels.models.folder import NATURAL_TASKS, load_exported_predictor
    from tasks.pyfunc_model import SeqModelPyfunc
    from tasks.registry import METADATA_KEY, exported_folder

    meta = (info.metadata or {}).get(METADATA_KEY)
    if meta is None:
        _fail(f"{model_uri} is a transformers model not logged by seqmodels: no {METADATA_KEY}")
    kind = NATURAL_TASKS.get(meta["task"], "generate")
    _check_natural_task(model_uri, kind, natural_task)
    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    pyfunc = SeqModelPyfunc()
    pyfunc.default_task = kind
    pyfunc.predictor = load_exported_predictor(
        exported_folder(local, info.flavors["transformers"]), meta
    )
    return LoadedPredictor(pyfunc)


class LoadedPredictor:
    """The seqmodels pyfunc's predict on a predictor built here (the same call as a loaded
    MLflow pyfunc: predict(lines, params=...))."""

    def __init__(self, pyfunc) -> None:
        self.pyfunc = pyfunc

    def predict(self, lines: list[str], params: dict | None = None) -> list[str]:
        return self.pyfunc.predict(None, lines, params)


# A model's natural task -> (what it is called, the commands that use it).
MODEL_KINDS = {
    "translate": ("translation", "translate"),
    "summarize": ("summarization", "summarize"),
    "generate": ("language", "generate or score"),
}


def _check_natural_task(model_uri: str, default: str, natural_task: str) -> None:
    """Exit 2 when the model's natural task is not the command's."""
    if default != natural_task:
        kind, command = MODEL_KINDS.get(default, ("language", "generate or score"))
        _fail(f"{model_uri} is a {kind} model: use `seqmodels {command}`")


def _input_lines(input_file: Path | None) -> Iterator[list[str]]:
    """Lines of --input or stdin (without their line ends), CHUNK_LINES at a time."""
    stream = open(input_file, encoding="utf-8") if input_file else sys.stdin
    try:
        chunk: list[str] = []
        for line in stream:
            chunk.append(line.rstrip("\r\n"))
            if len(chunk) == CHUNK_LINES:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
    finally:
        if input_file:
            stream.close()


def _one_line(text: str) -> str:
    """One output per line: backslashes and line ends inside an output are escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _predict_lines(model, input_file: Path | None, params: dict) -> Iterator[tuple[str, str]]:
    for chunk in _input_lines(input_file):
        try:
            outputs = model.predict(chunk, params=params)
        except ValueError as exc:  # a request the model cannot serve (a masked LM asked to
            _fail(str(exc))  # generate): the reason, not a traceback
        yield from zip(chunk, outputs, strict=True)


MODEL_HELP = "Registry URI of the model: models:/NAME@ALIAS, models:/NAME/VERSION or runs:/..."
INPUT_OPTION = typer.Option(None, "--input", "-i", help="Read lines from this file, not stdin.")
URI_OPTION = typer.Option(
    None, "--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else the config's)."
)
CONFIG_OPTION = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="Config naming the store.")


@app.command()
def export(
    *,  # typer passes every option by name
    model: str = typer.Argument(..., help="models:/NAME@ALIAS or models:/NAME/VERSION"),
    fmt: str = typer.Option("ctranslate2", "--format", help="Export format: ctranslate2."),
    quantization: str = typer.Option(
        "float32", "--quantization", "-q", help="int8, int8_float16, float16 or float32."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the export to."),
    tracking_uri: str | None = URI_OPTION,
    config: Path = CONFIG_OPTION,
) -> None:
    """Export a registered Transformer for fast inference (CTranslate2) and register it as a
    new version of the same model (tags format, quantization, parent_version; no alias)."""
    from seqmodels.models.ct2_export import QUANTIZATIONS

    if fmt != "ctranslate2":
        _fail(f"unknown --format {fmt!r}: the only export format is ctranslate2")
    if quantization not in QUANTIZATIONS:
        _fail(f"unknown --quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}")
    uri = _tracking_uri(tracking_uri, config)
    _quiet_telemetry()
    _check_store(uri)
    from mlflow.exceptions import MlflowException

    from tasks.export import export_registered_model

    try:
        registered = export_registered_model(model, quantization, out, uri)
    except (ValueError, MlflowException) as exc:
        _fail(f"cannot export {model}: {getattr(exc, 'message', None) or exc}")
    print(registered["model_uri"])
    err_console.print(f"{model} exported to {out} ({fmt}, {quantization})")


@app.command()
def translate(
    model: str = typer.Option(MT_MODEL, "--model", "-m", help=MODEL_HELP),
    input_file: Path | None = INPUT_OPTION,
    tracking_uri: str | None = URI_OPTION,
    config: Path = CONFIG_OPTION,
) -> None:
    """Translate each input line; one translation per line on stdout."""
    _print_line_by_line(model, _tracking_uri(tracking_uri, config), input_file, "translate")


@app.command()
def summarize(
    model: str = typer.Option(SUM_MODEL, "--model", "-m", help=MODEL_HELP),
    input_file: Path | None = INPUT_OPTION,
    tracking_uri: str | None = URI_OPTION,
    config: Path = CONFIG_OPTION,
) -> None:
    """Summarise each input line (one document per line); one summary per line on stdout."""
    _print_line_by_line(model, _tracking_uri(tracking_uri, config), input_file, "summarize")


def _print_line_by_line(model: str, tracking_uri: str, input_file: Path | None, task: str):
    """One output line per input line of a translate/summarize request."""
    loaded = _load_model(model, tracking_uri, task)
    for source, output in _predict_lines(loaded, input_file, {"task": task}):
        # An empty line stays empty rather than becoming whatever the model makes of nothing.
        print(_one_line(output) if source.strip() else "", flush=True)


@app.command()
def generate(
    *,  # typer passes every option by name
    model: str = typer.Option(LM_MODEL, "--model", "-m", help=MODEL_HELP),
    input_file: Path | None = INPUT_OPTION,
    max_new_tokens: int = typer.Option(60, help="Tokens to sample after each prompt."),
    temperature: float = typer.Option(0.8, help="Sampling temperature (neural models)."),
    tracking_uri: str | None = URI_OPTION,
    config: Path = CONFIG_OPTION,
) -> None:
    """Continue each input line (a prompt); one continuation per line on stdout.

    Line ends inside a continuation are written as \\n (and a backslash as \\\\)."""
    loaded = _load_model(model, _tracking_uri(tracking_uri, config), "generate")
    params = {"task": "generate", "max_new_tokens": max_new_tokens, "temperature": temperature}
    for _, continuation in _predict_lines(loaded, input_file, params):
        print(_one_line(continuation), flush=True)


@app.command()
def score(
    model: str = typer.Option(LM_MODEL, "--model", "-m", help=MODEL_HELP),
    input_file: Path | None = INPUT_OPTION,
    tracking_uri: str | None = URI_OPTION,
    config: Path = CONFIG_OPTION,
) -> None:
    """Perplexity per token of each input line on stdout; a summary on stderr."""
    loaded = _load_model(model, _tracking_uri(tracking_uri, config), "generate")
    values = []
    for _, perplexity in _predict_lines(loaded, input_file, {"task": "score"}):
        values.append(float(perplexity))
        print(perplexity, flush=True)
    if values:
        # Per-line perplexities average geometrically: the mean of their log is a mean NLL.
        geo = math.exp(sum(math.log(v) for v in values) / len(values))
        err_console.print(
            f"{len(values)} lines: mean perplexity per token {sum(values) / len(values):.4f}, "
            f"geometric mean {geo:.4f}, min {min(values):.4f}, max {max(values):.4f} ({model})",
            highlight=False,
        )
    else:
        err_console.print("no input lines")


@app.command()
def compare(
    experiment: str = typer.Argument(..., help="Registered model (= experiment) name."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Report folder (default: runs/reports/EXPERIMENT)."
    ),
    metric: str | None = typer.Option(
        None, help="Primary metric (default: the one promotion decides by)."
    ),
    tracking_uri: str | None = URI_OPTION,
    config: Path = CONFIG_OPTION,
) -> None:
    """Compare every registered version of EXPERIMENT: a table, a Markdown report and plots.

    Written to --out, logged to MLflow (a new run tagged stage=compare), shown in Prefect."""
    _quiet_telemetry()
    uri = _tracking_uri(tracking_uri, config)
    _check_store(uri)
    from mlflow.exceptions import MlflowException

    from tasks.tracking import mlflow_client

    try:  # fail fast, before Prefect starts
        mlflow_client(uri).get_registered_model(experiment)
    except MlflowException:
        _fail(f"no registered model {experiment!r} in {uri}")
    from flows.compare import compare_flow
    from seqmodels.evaluation.comparison import TEXT_COLUMNS

    out_dir = (out or Path("runs") / "reports" / experiment).resolve()
    result = compare_flow(experiment, uri, str(out_dir), metric)
    table = Table(title=f"{experiment}: registered versions")
    for column in result["header"]:
        text = column in TEXT_COLUMNS
        # Names and digests are not wrapped (a wrapped row is hard to grep); numbers shrink.
        table.add_column(column, justify="left" if text else "right", no_wrap=text)
    for cells in result["cells"]:
        table.add_row(*cells)
    console.print(table)
    console.print(f"report: {result['files']['report']}  (MLflow run {result['run_id']})")


if __name__ == "__main__":
    app()
