"""The champion/challenger decision: paired test, verdict, registry tags and a Markdown report.

A new version is the `challenger`; it replaces the `champion` only if it is better on the same
test set and the paired bootstrap gives p < alpha, or if there is no champion yet. Everything
here works on plain values (the outputs records written by `seqmodels.evaluation.scoring`);
tasks/promotion.py moves the registry aliases and logs the results.
"""

from __future__ import annotations

import numpy as np

from seqmodels.config import ExperimentConfig
from seqmodels.evaluation.significance import (
    Comparison,
    compare_language_models,
    compare_mean_scores,
    compare_translations,
)

# Registry alias names: the version in service, and the newest version being judged.
CHAMPION, CHALLENGER = "champion", "challenger"


def compare_with_champion(
    challenger: dict, champion: dict, experiment: ExperimentConfig
) -> Comparison:
    """Paired bootstrap test of two outputs records (see scoring.outputs_record) on one test
    set: BLEU over hypotheses for translation, the mean of per-example ROUGE F1 for
    summarisation, bits per character over lines otherwise."""
    n = experiment.evaluation.bootstrap_samples
    if experiment.task == "summarization":
        metric = experiment.primary_metric
        return compare_mean_scores(
            np.asarray(challenger["per_example"][metric]),
            np.asarray(champion["per_example"][metric]),
            metric,
            n,
        )
    if experiment.task == "translation":
        return compare_translations(
            challenger["hypotheses"], champion["hypotheses"], challenger["references"], n
        )
    return compare_language_models(
        np.asarray(challenger["line_nll"]),
        np.asarray(champion["line_nll"]),
        np.asarray(challenger["line_chars"]),
        n,
    )


def decide(comparison: Comparison | None, higher_is_better: bool, alpha: float) -> tuple[bool, str]:
    """Whether the challenger becomes champion, and why. `None`: there is no champion yet."""
    if comparison is None:
        return True, "no champion yet"
    better = (comparison.challenger > comparison.champion) == higher_is_better and (
        comparison.challenger != comparison.champion
    )
    if better and comparison.p_value < alpha:
        return True, f"better and significant (p={comparison.p_value:.4f} < {alpha})"
    if better:
        return False, f"better but not significant (p={comparison.p_value:.4f} >= {alpha})"
    return False, f"not better (p={comparison.p_value:.4f})"


def promotion_tags(
    comparison: Comparison | None,
    promoted: bool,
    reason: str,
    champion_version: str | None,
    alpha: float,
) -> dict[str, str]:
    """The `promotion.*` tags recorded on the challenger's model version."""
    tags = {
        "promotion.decision": "promoted" if promoted else "not promoted",
        "promotion.reason": reason,
        "promotion.champion_version": str(champion_version),
        "promotion.alpha": str(alpha),
    }
    if comparison is not None:
        tags.update(
            {
                "promotion.metric": comparison.metric,
                "promotion.challenger_score": f"{comparison.challenger:.6f}",
                "promotion.champion_score": f"{comparison.champion:.6f}",
                "promotion.p_value": f"{comparison.p_value:.6f}",
                "promotion.challenger_ci": "[{:.4f}, {:.4f}]".format(*comparison.challenger_ci),
                "promotion.champion_ci": "[{:.4f}, {:.4f}]".format(*comparison.champion_ci),
            }
        )
    return tags


def decision_summary(version: str, model_name: str, promoted: bool, reason: str) -> str:
    """One line for logs: 'version 3 (transformer): promoted to champion (no champion yet)'."""
    verdict = f"promoted to champion ({reason})" if promoted else f"not promoted ({reason})"
    return f"version {version} ({model_name}): {verdict}"


def decision_markdown(
    name: str,
    version: str,
    *,
    model_name: str,
    champion: str | None,
    c: Comparison | None,
    promoted: bool,
    reason: str,
) -> str:
    """The decision report: verdict, both scores with their 95% intervals, the p-value."""
    lines = [f"# Promotion decision: {name} version {version} ({model_name})", ""]
    lines.append(f"**{'promoted to champion' if promoted else 'champion kept'}**: {reason}")
    if c is not None:
        lines += [
            "",
            f"| | version | {c.metric} | 95% interval |",
            "|---|---:|---:|---|",
            f"| challenger | {version} | {c.challenger:.4f} | "
            f"{c.challenger_ci[0]:.4f} – {c.challenger_ci[1]:.4f} |",
            f"| champion | {champion} | {c.champion:.4f} | "
            f"{c.champion_ci[0]:.4f} – {c.champion_ci[1]:.4f} |",
            "",
            f"Paired bootstrap, {c.n_samples} resamples: p = {c.p_value:.4f}.",
        ]
    return "\n".join(lines) + "\n"
