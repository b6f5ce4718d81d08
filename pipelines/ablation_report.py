"""The ablation's comparison: a markdown table and a plot of one metric across variants and folds.

Both read the same list of results, one per variant, in grid order:
    {"name": str, "overrides": {dotted key: value}, "summary": report metrics.json or None (failed)}
The first variant is the reference the others are compared with (for the default grid: the full
L2RCLIP, RankFormer on and the cop loss on). The plot shows the spread, not only the mean: with
five folds a difference smaller than the fold-to-fold spread is not a finding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from l2rclip.stages.common import PIPELINE_CHECK
from pipelines.common import lower_is_better


def _cell(value: Any) -> str:
    """A params value as YAML would write it (`true`, `0.0`, `plain`)."""
    return value if isinstance(value, str) else json.dumps(value)


def _entry(result: dict[str, Any], metric: str) -> dict[str, Any] | None:
    summary = result["summary"] or {}
    return summary.get(metric) if isinstance(summary.get(metric), dict) else None


def _pipeline_check(results: Sequence[dict[str, Any]]) -> bool:
    """Whether any variant ran on the random fallback backbone (its numbers are not CLIP results)."""
    return any(result["summary"] and result["summary"].get("is_clip") is False for result in results)


def comparison_table(results: Sequence[dict[str, Any]], metric: str) -> str:
    """Markdown: one row per variant with its settings, the metric's mean, std, folds and change.

    Variants without the metric (failed, or a report without it) are listed as failed.
    """
    keys = list(dict.fromkeys(key for result in results for key in result["overrides"]))
    direction = "lower" if lower_is_better(metric) else "higher"
    lines = [f"# Ablation: {metric} ({direction} is better)", "",
             f"| variant | {' | '.join(keys)} | mean | std | per fold | change vs {results[0]['name']} |",
             "|---" * (len(keys) + 5) + "|"]
    reference = _entry(results[0], metric)
    for result in results:
        settings = " | ".join(_cell(result["overrides"].get(key, "")) for key in keys)
        entry = _entry(result, metric)
        if entry is None:
            lines.append(f"| {result['name']} | {settings} | failed | | | |")
            continue
        folds = ", ".join(f"{value:.3f}" for value in entry["folds"])
        change = f"{entry['mean'] - reference['mean']:+.4f}" if reference else ""
        lines.append(f"| {result['name']} | {settings} | {entry['mean']:.4f} | {entry['std']:.4f} | {folds} "
                     f"| {change} |")
    scored = [(result["name"], entry["mean"]) for result in results if (entry := _entry(result, metric))]
    if scored:
        best = (min if lower_is_better(metric) else max)(scored, key=lambda item: item[1])
        lines += ["", f"Best: **{best[0]}** (mean {metric} {best[1]:.4f}); std is over folds (ddof=1)."]
    if _pipeline_check(results):
        lines += ["", f"> **{PIPELINE_CHECK}**"]
    return "\n".join(lines) + "\n"


def comparison_plot(results: Sequence[dict[str, Any]], metric: str, path: Path) -> Path:
    """Mean +- std error bars per variant with each fold's value as a dot; returns the PNG's path."""
    shown = [(result["name"], entry) for result in results if (entry := _entry(result, metric))]
    fig = Figure(figsize=(max(4.0, 1.4 * len(shown) + 1.5), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for position, (_, entry) in enumerate(shown):
        ax.errorbar(position, entry["mean"], yerr=entry["std"], fmt="o", color="C0", capsize=6, markersize=8,
                    label="mean +- std" if position == 0 else None)
        folds = np.asarray(entry["folds"], dtype=float)
        offsets = np.linspace(-0.15, 0.15, len(folds)) if len(folds) > 1 else np.zeros(1)
        ax.scatter(position + 0.25 + offsets, folds, color="C1", s=18, zorder=3,
                   label="folds" if position == 0 else None)
    ax.set_xticks(range(len(shown)), [name for name, _ in shown], rotation=20, ha="right")
    ax.set_xlim(-0.6, len(shown) - 0.2)
    ax.set_ylabel(metric)
    ax.grid(axis="y", alpha=0.3)
    if shown:
        ax.legend(loc="best", fontsize="small")
    suffix = "\n" + PIPELINE_CHECK if _pipeline_check(results) else ""
    ax.set_title(f"Ablation: {metric}{suffix}", fontsize="medium")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
