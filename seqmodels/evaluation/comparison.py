"""Compare registered versions of a model: rows for a table, a Markdown report and plots.

The input is one plain record per version (see `VersionRecord`), as tasks/compare.py reads
them from the model registry; `build_comparison` turns them into the comparison dict that
`table_columns`, `report_markdown` and `write_report` take:

    {"name": ..., "primary_metric": "test_bleu", "higher_is_better": True, "rows": [...]}

with one row per version (version, model, model_type, run_id, primary, ci, metrics, cis,
n_parameters, train_time_s, tokens_per_s, aliases, history).
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import TypedDict

from seqmodels.evaluation.promotion import CHAMPION

# Primary metric of each task (what promotion decides by) and whether higher is better.
ROUGE_METRICS = ("test_rouge1", "test_rouge2", "test_rougeL", "test_rougeLsum")
PRIMARY_METRICS = {
    "test_bleu": True,
    "test_bits_per_char": False,
    "test_pll_bits_per_char": False,
    **dict.fromkeys(ROUGE_METRICS, True),
}
TEST_METRICS = (
    "test_bleu",
    "test_chrf",
    "test_ter",
    *ROUGE_METRICS,
    "test_rougeL_bestref",
    "test_bits_per_char",
    "test_ppl_per_word",
    "test_ppl_per_token",
    "test_pll_bits_per_char",
    "test_pll_ppl_per_word",
)
PLL_NOTE = (
    "Masked LMs are scored by pseudo-log-likelihood (`test_pll_*`, Salazar et al. 2020: each "
    "token predicted from both sides with it masked): those numbers are not comparable with "
    "the causal models' bits per character and perplexities."
)
HIGHER_IS_BETTER = {"test_bleu", "test_chrf", *ROUGE_METRICS, "test_rougeL_bestref"}
ROUGE_NOTE = (
    "ROUGE is rouge-score's F1 x100 with stemming. `test_rouge*` score against the single "
    "reference (the primary protocol, as published numbers); `*_bestref` take the best of all "
    "references of an example and are not comparable with them."
)
BASELINE = "baseline"  # the `version` of a baseline row (scored, never registered)
CURVES = ("train_loss", "valid_loss")
# The other table columns are numbers.
TEXT_COLUMNS = ("model", "type", "corpus version", "aliases")


class _VersionKey(TypedDict):
    version: str


class VersionRecord(_VersionKey, total=False):
    """What the registry knows of one model version; every key but `version` may be missing.

    `version_tags` are the model version's tags (`model_name`, `model_type`, `promotion.*`),
    `run_tags` its training run's (`model_type`); `metrics` are the run's summary values and
    `history` holds (step, value) points of the CURVES keys.
    """

    run_id: str
    run_name: str
    version_tags: dict[str, str]
    run_tags: dict[str, str]
    aliases: list[str]
    metrics: dict[str, float]
    history: dict[str, list[tuple[int, float]]]


def primary_metric_of(records: list[VersionRecord]) -> str | None:
    """The metric promotion decided by (newest version first), else the first PRIMARY_METRICS
    key any version logged; None when there is neither."""
    for record in reversed(records):
        tagged = record.get("version_tags", {}).get("promotion.metric")
        if tagged in PRIMARY_METRICS:
            return tagged
    for name in PRIMARY_METRICS:
        if any(name in record.get("metrics", {}) for record in records):
            return name
    return None


def comparison_row(record: VersionRecord, metric: str | None) -> dict:
    """One table row: the primary metric with its interval, the other test metrics, cost
    figures, aliases and loss curves of one version."""
    m = record.get("metrics", {})
    tags, run_tags = record.get("version_tags", {}), record.get("run_tags", {})
    ci = (m.get(f"{metric}_ci_low"), m.get(f"{metric}_ci_high")) if metric else (None, None)
    history = record.get("history", {})
    model = tags.get("model_name") or record.get("run_name", "")
    if "format" in tags:  # an export (`seqmodels export`) of another version: say so
        packaging = " ".join(tags[k] for k in ("format", "quantization") if k in tags)
        model += f" ({packaging} of v{tags.get('parent_version', '?')})"
    return {
        "version": str(record["version"]),
        "model": model,
        "model_type": tags.get("model_type") or run_tags.get("model_type", ""),
        # The corpus version the model was trained on (lineage tag of the version or its run).
        "corpus_version": tags.get("corpus_version") or run_tags.get("corpus_version"),
        "run_id": record.get("run_id", ""),
        "primary": m.get(metric) if metric else None,
        "ci": ci if None not in ci else None,
        "metrics": {k: m[k] for k in TEST_METRICS if k in m and k != metric},
        "cis": {
            k: (m[f"{k}_ci_low"], m[f"{k}_ci_high"])
            for k in TEST_METRICS
            if f"{k}_ci_low" in m and f"{k}_ci_high" in m
        },
        "n_parameters": m.get("n_parameters"),
        "train_time_s": m.get("train_time_s"),
        "tokens_per_s": m.get("tokens_per_s"),
        "aliases": sorted(record.get("aliases", [])),
        "history": {k: sorted(points) for k, points in history.items() if points},
    }


def build_comparison(
    name: str, records: list[VersionRecord], primary_metric: str | None = None
) -> dict:
    """The comparison of registered model `name`, versions in ascending order. The primary
    metric is `primary_metric` when given, otherwise found by `primary_metric_of`."""
    # Versions in order, then baselines (runs tagged stage=baseline, version "baseline").
    records = sorted(
        records,
        key=lambda r: (
            r["version"] == BASELINE,
            int(r["version"]) if r["version"].isdigit() else 0,
        ),
    )
    metric = primary_metric or primary_metric_of(records)
    rows = [comparison_row(record, metric) for record in records]
    higher = PRIMARY_METRICS.get(metric, metric in HIGHER_IS_BETTER) if metric else False
    return {"name": name, "primary_metric": metric, "higher_is_better": higher, "rows": rows}


def fmt(value: float | None) -> str:
    """Numbers as a table shows them: '-' when missing, fewer decimals as they grow."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def fmt_count(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.0f}"


def table_columns(comparison: dict) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the comparison table, shared by the CLI and the Markdown report."""
    metric = comparison["primary_metric"] or "primary metric"
    rows = comparison["rows"]
    others = [k for k in TEST_METRICS if any(k in r["metrics"] for r in rows)]
    header = ["version", "model", "type", "corpus version", metric, "95% CI", *others]
    header += ["parameters", "train time (s)", "tokens/s", "aliases"]
    cells = []
    for r in rows:
        ci = f"[{fmt(r['ci'][0])}, {fmt(r['ci'][1])}]" if r["ci"] else "-"
        other_cells = []
        for k in others:
            text = fmt(r["metrics"].get(k))
            if k in r["cis"]:
                text += f" [{fmt(r['cis'][k][0])}, {fmt(r['cis'][k][1])}]"
            other_cells.append(text)
        cells.append(
            [
                r["version"],
                r["model"],
                r["model_type"],
                r.get("corpus_version") or "-",
                fmt(r["primary"]),
                ci,
                *other_cells,
                fmt_count(r["n_parameters"]),
                "-" if r["train_time_s"] is None else f"{r['train_time_s']:,.1f}",
                fmt(r["tokens_per_s"]),
                ", ".join(r["aliases"]),
            ]
        )
    return header, cells


def report_markdown(comparison: dict, plots: dict[str, str], tracking_uri: str) -> str:
    header, cells = table_columns(comparison)
    metric = comparison["primary_metric"]
    direction = "higher is better" if comparison["higher_is_better"] else "lower is better"
    champion = [r for r in comparison["rows"] if CHAMPION in r["aliases"]]
    lines = [
        f"# {comparison['name']}: registered versions",
        "",
        f"Generated {dt.datetime.now().isoformat(timespec='seconds')} from `{tracking_uri}`. "
        f"Primary metric: `{metric}` ({direction}); the champion is "
        + (f"version {champion[0]['version']} ({champion[0]['model']})." if champion else "unset.")
        + " Confidence intervals are shown where the run logged `<metric>_ci_low`/`_ci_high`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(":--" if h in TEXT_COLUMNS else "--:" for h in header) + "|",
        *("| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells),
        "",
    ]
    if any(k.startswith("test_pll_") for k in header):
        lines += [PLL_NOTE, ""]
    if any(k.startswith("test_rouge") for k in header):
        lines += [ROUGE_NOTE, ""]
    if any(r["version"] == BASELINE for r in comparison["rows"]):
        lines += ["Rows of version `baseline` are scored like a model but never registered.", ""]
    no_curves = [_label(r) for r in comparison["rows"] if not r["history"]]
    for title, file in plots.items():
        lines += [f"## {title}", "", f"![{title}]({file})", ""]
    if no_curves:
        lines.append(f"No train/valid loss history (not trained by steps): {', '.join(no_curves)}.")
    if plots:
        lines.append(
            "Training loss is the optimised loss (label-smoothed for translation models); "
            "validation loss is unsmoothed, in nats per target token."
        )
    return "\n".join(lines) + "\n"


def _label(row: dict) -> str:
    if row["version"] == BASELINE:
        return f"{row['model']} (baseline)"
    return f"v{row['version']} {row['model']}"


def plot_learning_curves(comparison: dict, path: Path) -> bool:
    """train_loss and valid_loss per step, one line per version; False when nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = [r for r in comparison["rows"] if r["history"]]
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True, sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, key in zip(axes, CURVES, strict=True):
        for i, r in enumerate(rows):
            points = r["history"].get(key)
            if points:
                steps, values = zip(*points, strict=True)
                marker = "o" if len(points) < 20 else None  # few evaluations: show each one
                ax.plot(steps, values, marker=marker, color=colors(i % 10), label=_label(r))
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
    values = [v for r in rows for h in r["history"].values() for _, v in h if v > 0]
    if values and max(values) / min(values) > 4:  # early losses dwarf the late ones otherwise
        axes[0].set_yscale("log")
        axes[0].yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axes[0].yaxis.set_minor_formatter(NullFormatter())
    axes[0].set_ylabel("loss (nats per token)")
    axes[1].legend(fontsize="small", loc="upper right")
    fig.suptitle(f"{comparison['name']}: learning curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _metric_value(row: dict, key: str, primary: str | None) -> float | None:
    return row["primary"] if key == primary else row["metrics"].get(key)


def _metric_interval(row: dict, key: str, primary: str | None) -> tuple[float, float] | None:
    return row["ci"] if key == primary else row["cis"].get(key)


def _draw_bars(ax, rows: list[dict], key: str, primary: str | None) -> bool:
    """The bar chart of `key` on `ax`; True when it drew any confidence interval."""
    # Every version keeps its place in every chart; a missing value is marked n/a.
    heights = [_metric_value(r, key, primary) for r in rows]
    champion = [CHAMPION in r["aliases"] for r in rows]
    ax.bar(
        range(len(rows)),
        [h or 0.0 for h in heights],
        color=[
            "tab:orange" if c else "tab:gray" if r["version"] == BASELINE else "tab:blue"
            for c, r in zip(champion, rows, strict=True)
        ],
        edgecolor="black",
        linewidth=[2 if c else 0.5 for c in champion],
    )
    # Whiskers only where an interval was logged: a zero-width one would claim certainty.
    intervals = [_metric_interval(r, key, primary) for r in rows]
    with_ci = [(i, ci) for i, ci in enumerate(intervals) if ci]
    tops = [h or 0.0 for h in heights]
    for i, ci in with_ci:
        tops[i] = max(tops[i], ci[1])
    for i, h in enumerate(heights):  # the value above the bar, clear of its whisker
        ax.annotate(
            "n/a" if h is None else fmt(h),
            (i, tops[i]),
            xytext=(0, 5),
            textcoords="offset points",
            ha="center",
            va="bottom",
        )
    if with_ci:
        xs = [i for i, _ in with_ci]
        ys = [heights[i] for i in xs]
        below = [max(ys[j] - ci[0], 0.0) for j, (_, ci) in enumerate(with_ci)]
        above = [max(ci[1] - ys[j], 0.0) for j, (_, ci) in enumerate(with_ci)]
        ax.errorbar(xs, ys, yerr=[below, above], fmt="none", ecolor="black", capsize=8, lw=1.5)
    ax.set_xticks(range(len(rows)), [_label(r) for r in rows], rotation=20, ha="right")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    direction = "higher" if key in HIGHER_IS_BETTER else "lower"
    ax.set_title(f"{key} ({direction} is better)")
    ax.set_ylabel(key)
    ax.margins(y=0.15)
    ax.grid(True, axis="y", alpha=0.3)
    return bool(with_ci)


def plot_metric_bars(comparison: dict, metrics: list[str], path: Path, title: str) -> bool:
    """One bar chart per metric, a bar per version, error bars for confidence intervals; the
    champion's bars are outlined. False when no version has any of `metrics`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison["rows"]
    primary = comparison["primary_metric"]
    metrics = [k for k in metrics if any(_metric_value(r, k, primary) is not None for r in rows)]
    if not metrics:
        return False
    width = max(5.5, 0.7 * len(rows) + 2.5)
    fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), 5), squeeze=False)
    drew_ci = [_draw_bars(ax, rows, k, primary) for ax, k in zip(axes[0], metrics, strict=True)]
    handles = [
        plt.Rectangle((0, 0), 1, 1, fc="tab:orange", ec="black", lw=2),
        plt.Rectangle((0, 0), 1, 1, fc="tab:blue", ec="black", lw=0.5),
    ]
    labels = ["champion", "other versions"]
    if any(r["version"] == BASELINE for r in rows):
        handles.append(plt.Rectangle((0, 0), 1, 1, fc="tab:gray", ec="black", lw=0.5))
        labels.append("baseline (not registered)")
    if any(drew_ci):
        handles.append(plt.Line2D([], [], color="black", marker="_", markersize=12, lw=1.5))
        labels.append("95% confidence interval")
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(f"{comparison['name']}: {title}")
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # room for the legend below the tick labels
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_metric_over_corpus_versions(comparison: dict, path: Path) -> bool:
    """The primary metric of each registered version against the corpus version it was
    trained on, corpus versions in the order versions were registered (a scheduled run that
    learns from new data adds one to the right), a line per model; the champion is ringed.
    False when the versions saw fewer than two corpus versions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = comparison["primary_metric"]
    rows = [
        r
        for r in comparison["rows"]
        if r["version"] != BASELINE and r["corpus_version"] and r["primary"] is not None
    ]
    corpus_versions = list(dict.fromkeys(r["corpus_version"] for r in rows))
    if primary is None or len(corpus_versions) < 2:
        return False
    x_of = {v: i for i, v in enumerate(corpus_versions)}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(corpus_versions) + 3), 4.5))
    colors = plt.get_cmap("tab10")
    for i, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        mine = [r for r in rows if r["model"] == model]
        xs = [x_of[r["corpus_version"]] for r in mine]
        ys = [r["primary"] for r in mine]
        ax.plot(xs, ys, marker="o", color=colors(i % 10), label=model)
        for x, r in zip(xs, mine, strict=True):
            if r["ci"]:
                low, high = r["ci"]
                ax.vlines(x, low, high, color=colors(i % 10), alpha=0.5)
            if CHAMPION in r["aliases"]:
                ax.plot(x, r["primary"], marker="o", ms=14, mfc="none", mec="tab:orange", mew=2)
            ax.annotate(
                f"v{r['version']}", (x, r["primary"]), xytext=(6, 4), textcoords="offset points"
            )
    ax.set_xticks(range(len(corpus_versions)), [v[:8] for v in corpus_versions])
    ax.set_xlabel("corpus version (in the order the versions were registered)")
    direction = "higher" if comparison["higher_is_better"] else "lower"
    ax.set_ylabel(f"{primary} ({direction} is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle(f"{comparison['name']}: {primary} by corpus version (champion ringed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(comparison: dict, out_dir: Path, tracking_uri: str) -> dict[str, Path]:
    """Markdown report and PNG plots under `out_dir`; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    if plot_learning_curves(comparison, out_dir / "learning_curves.png"):
        plots["Learning curves"] = "learning_curves.png"
    primary = comparison["primary_metric"]
    if primary and plot_metric_bars(
        comparison, [primary], out_dir / "primary_metric.png", "primary metric"
    ):
        plots[f"Primary metric: {primary}"] = "primary_metric.png"
    if plot_metric_over_corpus_versions(comparison, out_dir / "corpus_versions.png"):
        plots[f"{primary} by corpus version"] = "corpus_versions.png"
    others = [k for k in TEST_METRICS if k != primary]
    if plot_metric_bars(comparison, others, out_dir / "test_metrics.png", "other test metrics"):
        plots["Other test metrics"] = "test_metrics.png"
    report = out_dir / "comparison.md"
    report.write_text(report_markdown(comparison, plots, tracking_uri), encoding="utf-8")
    return {"report": report, **{file: out_dir / file for file in plots.values()}}
