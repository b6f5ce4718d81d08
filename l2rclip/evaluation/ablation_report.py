"""The ablation's comparison: a markdown table and a figure of one metric across variants and folds.

Both read the same list of results, one per variant, in grid order:
    {"name": str, "overrides": {dotted key: value}, "summary": report metrics.json or None (failed),
     "folds": [fold ids] (optional: the order of the summary's per-fold values; default 0, 1, ...)}
Every variant is compared with one reference variant (the first, unless named: for the default grid
the full L2RCLIP, RankFormer on and the cop loss on) *paired over the folds both ran*: the folds
share their test images, so the per-fold differences cancel the fold-to-fold spread that would
swamp a comparison of means. The table gives the mean difference, its 95 % t-interval over folds
and the paired t-test's p-value, and calls a variant better or worse only when the interval
excludes 0 ("not distinguishable" otherwise; one interval per comparison, no multiplicity
correction). With one fold there is no spread at all: std, interval and test are refused, not
shown as 0. For the MAE metrics the median baseline (always predicting the training split's
median rank, `test/mae_median_baseline`) is in the table and drawn as a line in the figure.

`outputs/ablation/` (ablation.md, ablation.png) is git-ignored, not a DVC output: the flow writes it
from `dvc exp show` after the experiments ran, outside any stage, and rewrites it on every run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from l2rclip.metrics import lower_is_better
from l2rclip.models.kinds import backbone_label, kind_of, least_clip

CONFIDENCE = 0.95
# the median baseline in the metric's units (rank values or rank indices)
BASELINES = {
    "test/mae": "test/mae_median_baseline",
    "test/mae_argmax": "test/mae_median_baseline",
    "test/mae_index": "test/mae_median_baseline_index",
    "test/mae_argmax_index": "test/mae_median_baseline_index",
}
NOT_DISTINGUISHABLE = "not distinguishable"


@dataclass(frozen=True)
class Paired:
    """A variant minus the reference over the `n` folds both ran; interval and test need n >= 2."""

    n: int
    mean: float | None
    ci: tuple[float, float] | None
    p: float | None
    verdict: str
    differences: tuple[float, ...] = ()


def _cell(value: Any) -> str:
    """A params value as YAML would write it (`true`, `0.0`, `plain`)."""
    return value if isinstance(value, str) else json.dumps(value)


def _entry(result: dict[str, Any], metric: str) -> dict[str, Any] | None:
    summary = result["summary"] or {}
    return summary.get(metric) if isinstance(summary.get(metric), dict) else None


def fold_values(result: dict[str, Any], metric: str) -> dict[int, float] | None:
    """The metric by fold id, or None when the variant has no value (failed).

    Raises:
        ValueError: `folds` is given and has another length than the summary's per-fold values.
    """
    entry = _entry(result, metric)
    if entry is None:
        return None
    values = [float(value) for value in entry["folds"]]
    ids = result.get("folds") or list(range(len(values)))
    if len(ids) != len(values):
        raise ValueError(
            f"ablation variant {result['name']!r}: {len(values)} values of {metric} in its report "
            f"but folds {list(ids)}; expected one value per fold"
        )
    return dict(zip((int(fold) for fold in ids), values, strict=True))


def _one_fold(n: int) -> str:
    return f"n/a ({n} fold{'s' if n != 1 else ''})"


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The t-interval of the mean over folds, or None with fewer than 2 values (no spread to use)."""
    return None if len(values) < 2 else _t_interval(values, confidence)


def _t_interval(values: Sequence[float], confidence: float) -> tuple[float, float]:
    """The t-interval of the mean of 2 or more values."""
    mean, sem = float(np.mean(values)), float(np.std(values, ddof=1)) / math.sqrt(len(values))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * sem
    return mean - half, mean + half


def paired(
    variant: dict[int, float], reference: dict[int, float], lower_better: bool, confidence: float = CONFIDENCE
) -> Paired:
    """The paired comparison over the folds both have: mean difference, t-interval, t-test, verdict."""
    common = sorted(set(variant) & set(reference))
    differences = tuple(variant[fold] - reference[fold] for fold in common)
    if len(common) < 2:
        return Paired(
            len(common),
            float(differences[0]) if differences else None,
            None,
            None,
            _one_fold(len(common)),
            differences,
        )
    mean = float(np.mean(differences))
    ci = _t_interval(differences, confidence)
    if float(np.ptp(differences)) == 0.0:  # the same difference on every fold: the t statistic is 0/0 or inf
        p = 1.0 if mean == 0.0 else 0.0
    else:
        p = float(stats.ttest_rel([variant[f] for f in common], [reference[f] for f in common]).pvalue)
    if ci[0] <= 0.0 <= ci[1]:
        verdict = NOT_DISTINGUISHABLE
    else:
        verdict = "better" if (ci[1] < 0.0) == lower_better else "worse"
    return Paired(len(common), mean, ci, p, verdict, differences)


def _reference_index(results: Sequence[dict[str, Any]], reference: str | None) -> int:
    names = [result["name"] for result in results]
    if reference is None:
        return 0
    if reference not in names:
        raise ValueError(
            f"ablation reference: expected one of the variants {', '.join(names)}, found {reference!r}"
        )
    return names.index(reference)


def _backbone_caveat(results: Sequence[dict[str, Any]]) -> str:
    """The label of the least CLIP-like backbone any variant ran on ('' when all ran on real CLIP)."""
    kinds = [kind_of(result["summary"]) for result in results if result["summary"]]
    return backbone_label(least_clip(kinds)) if kinds else ""


def _baseline_mean(result: dict[str, Any], metric: str) -> float | None:
    entry = _entry(result, BASELINES[metric]) if metric in BASELINES else None
    return float(entry["mean"]) if entry else None


def comparisons(
    results: Sequence[dict[str, Any]], metric: str, reference: str | None = None, confidence: float = CONFIDENCE
) -> list[Paired | None]:
    """Each variant against the reference (None for the reference itself and for failed variants)."""
    index = _reference_index(results, reference)
    ref = fold_values(results[index], metric)
    out: list[Paired | None] = []
    for position, result in enumerate(results):
        values = fold_values(result, metric)
        out.append(
            None
            if position == index or values is None or ref is None
            else paired(values, ref, lower_is_better(metric), confidence)
        )
    return out


def _comparison_cells(comparison: Paired | None, is_reference: bool, ref_name: str) -> list[str]:
    """Difference, interval, p-value and verdict of one row (n/a with its reason where undefined)."""
    if is_reference:
        return ["", "", "", "reference"]
    if comparison is None:
        return ["", "", "", f"no comparison ({ref_name} failed)"]
    undefined = comparison.verdict  # "n/a (1 fold)" where there is no interval
    return [
        f"{comparison.mean:+.4f}" if comparison.mean is not None else "",
        f"[{comparison.ci[0]:+.4f}, {comparison.ci[1]:+.4f}]" if comparison.ci else undefined,
        f"{comparison.p:.3g}" if comparison.p is not None else undefined,
        comparison.verdict,
    ]


def comparison_table(
    results: Sequence[dict[str, Any]], metric: str, reference: str | None = None, confidence: float = CONFIDENCE
) -> str:
    """Markdown: per variant its settings, mean, std and folds, and the paired difference to the reference.

    Variants without the metric (failed, or a report without it) are listed as failed.
    """
    index = _reference_index(results, reference)
    ref_name = results[index]["name"]
    keys = list(dict.fromkeys(key for result in results for key in result["overrides"]))
    with_baseline = any(_baseline_mean(result, metric) is not None for result in results)
    direction = "lower" if lower_is_better(metric) else "higher"
    columns = [
        "variant",
        *keys,
        "mean",
        "std",
        "per fold",
        *(["median baseline"] if with_baseline else []),
        f"difference to {ref_name}",
        f"{confidence:.0%} CI",
        "p (paired t)",
        "verdict",
    ]
    lines = [
        f"# Ablation: {metric} ({direction} is better)",
        "",
        "| " + " | ".join(columns) + " |",
        "|---" * len(columns) + "|",
    ]
    compared = comparisons(results, metric, reference, confidence)
    for position, (result, comparison) in enumerate(zip(results, compared, strict=True)):
        cells = [result["name"], *(_cell(result["overrides"].get(key, "")) for key in keys)]
        values = fold_values(result, metric)
        if values is None:
            cells += ["failed"] + [""] * (len(columns) - len(cells) - 1)
        else:
            folds = list(values.values())
            base = _baseline_mean(result, metric)
            cells += [
                f"{np.mean(folds):.4f}",
                f"{np.std(folds, ddof=1):.4f}" if len(folds) > 1 else _one_fold(len(folds)),
                ", ".join(f"{value:.3f}" for value in folds),
                *([f"{base:.4f}" if base is not None else ""] if with_baseline else []),
                *_comparison_cells(comparison, position == index, ref_name),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_findings(results, metric, index, confidence)]
    if caveat := _backbone_caveat(results):
        lines += ["", f"> **{caveat}**"]
    return "\n".join(lines) + "\n"


def _findings(results: Sequence[dict[str, Any]], metric: str, index: int, confidence: float) -> list[str]:
    """The sentences under the table: what the comparisons show and what they cannot."""
    ref_name = results[index]["name"]
    scored = [
        (result, comparison)
        for result, comparison in zip(results, comparisons(results, metric, ref_name, confidence), strict=True)
        if comparison
    ]
    lines = [
        f"Differences are variant minus {ref_name}, paired over the folds both ran; the {confidence:.0%} "
        "t-interval is over those folds (one per comparison, no multiplicity correction)."
    ]
    most = max((comparison.n for _, comparison in scored), default=None)
    if fold_values(results[index], metric) is None:
        lines.append(f"**The reference {ref_name} failed: no variant is compared.**")
    elif most is not None and most < 2:
        lines.append(
            f"**With {most} fold{'s' if most != 1 else ''} no variant can be compared**: there is no "
            "fold-to-fold spread, so std, intervals and tests are not defined (never 0); run more "
            "folds, e.g. `--set 'folds=[0,1,2,3,4]'`."
        )
    else:
        for verdict, text in (
            ("better", "Better than {}: {}."),
            ("worse", "Worse than {}: {}."),
            (NOT_DISTINGUISHABLE, "Not distinguishable from {} (the interval spans 0): {}."),
        ):
            names = [result["name"] for result, comparison in scored if comparison.verdict == verdict]
            if names:
                lines.append(text.format(ref_name, ", ".join(names)))
    known = [
        (result["name"], base, np.mean(list(values.values())))
        for result in results
        if (base := _baseline_mean(result, metric)) is not None and (values := fold_values(result, metric))
    ]
    if known:
        bases = {round(base, 6) for _, base, _ in known}
        shown = f"{known[0][1]:.4f}" if len(bases) == 1 else "per variant in the table"
        above = [name for name, base, mean in known if mean >= base]
        lines.append(
            f"Median baseline (`{BASELINES[metric]}`, always the training split's median rank): {shown}"
            + (f"; not better than it: {', '.join(above)}." if above else "; every variant is better.")
        )
    return lines


def _draw_spread(ax: Axes, position: float, values: Sequence[float], confidence: float, first: bool) -> None:
    """One variant: its per-fold values as dots and the mean with its t-interval (none with one fold)."""
    folds = np.asarray(values, dtype=float)  # (folds,)
    ci = interval(values, confidence)
    yerr = None if ci is None else [[folds.mean() - ci[0]], [ci[1] - folds.mean()]]
    label = f"mean, {confidence:.0%} CI over folds" if ci else "mean (1 fold: no CI)"
    ax.errorbar(
        position,
        folds.mean(),
        yerr=yerr,
        fmt="o",
        color="C0",
        capsize=6,
        markersize=8,
        zorder=4,
        label=label if first else None,
    )
    offsets = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
    ax.scatter(position + 0.22 + offsets, folds, color="C1", s=16, zorder=3, label="folds" if first else None)


def comparison_figure(
    results: Sequence[dict[str, Any]], metric: str, reference: str | None = None, confidence: float = CONFIDENCE
) -> Figure:
    """The comparison as a figure: the metric per variant, and the paired differences to the reference.

    Left: per-fold values, the mean with its CI, the median baseline as a line (the y range always
    includes it); right: the per-fold differences, their mean with its CI and the zero line. The
    legend sits below the panels, off the points.
    """
    index = _reference_index(results, reference)
    ref_name = results[index]["name"]
    shown = [(result, values) for result in results if (values := fold_values(result, metric))]
    versus = [
        (result["name"], comparison)
        for result, comparison in zip(results, comparisons(results, metric, reference, confidence), strict=True)
        if comparison
    ]
    fig = Figure(
        figsize=(max(5.0, 1.3 * len(shown) + 1.5) + (max(3.0, 1.2 * len(versus) + 1.0) if versus else 0), 4.8),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(
        1,
        2 if versus else 1,
        squeeze=False,
        width_ratios=[max(1, len(shown)), max(1, len(versus))] if versus else None,
    )[0]
    ax = axes[0]
    for position, (_, values) in enumerate(shown):
        _draw_spread(ax, position, list(values.values()), confidence, position == 0)
    plotted = [value for _, values in shown for value in values.values()]
    bases = [base for result, _ in shown if (base := _baseline_mean(result, metric)) is not None]
    if bases and np.allclose(bases, bases[0]):
        ax.axhline(bases[0], color="C3", linestyle="--", label="median baseline")
    elif bases:
        for position, (result, _) in enumerate(shown):
            if (base := _baseline_mean(result, metric)) is not None:
                ax.hlines(
                    base,
                    position - 0.4,
                    position + 0.5,
                    color="C3",
                    linestyle="--",
                    label="median baseline" if position == 0 else None,
                )
    if plotted:
        low, high = min(plotted + bases), max(plotted + bases)
        margin = 0.08 * (high - low) or 0.05 * max(abs(high), 1e-3)
        ax.set_ylim(low - margin, high + margin)
    ax.set_xticks(
        range(len(shown)),
        [r["name"] + (" (reference)" if r["name"] == ref_name else "") for r, _ in shown],
        rotation=20,
        ha="right",
    )
    ax.set_xlim(-0.6, len(shown) - 0.3)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per variant", fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
    if versus:
        _draw_differences(axes[1], versus, ref_name, metric, confidence)
    handles = [h for a in axes for h in a.get_legend_handles_labels()[0]]
    labels = [label for a in axes for label in a.get_legend_handles_labels()[1]]
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize="small")
    suffix = "\n" + caveat if (caveat := _backbone_caveat(results)) else ""
    fig.suptitle(
        f"Ablation: {metric} ({'lower' if lower_is_better(metric) else 'higher'} is better){suffix}",
        fontsize="medium",
    )
    return fig


def _draw_differences(
    ax: Axes, versus: Sequence[tuple[str, Paired]], ref_name: str, metric: str, confidence: float
) -> None:
    """Per compared variant: the per-fold differences, their mean with its CI, and the verdict."""
    for position, (_, comparison) in enumerate(versus):
        diffs = np.asarray(comparison.differences, dtype=float)  # (common folds,)
        if diffs.size == 0 or comparison.mean is None:  # no common fold: no mean either
            continue
        yerr = (
            None
            if comparison.ci is None
            else [[comparison.mean - comparison.ci[0]], [comparison.ci[1] - comparison.mean]]
        )
        label = f"paired difference, {confidence:.0%} CI" if yerr else "paired difference (1 fold: no CI)"
        ax.errorbar(
            position,
            comparison.mean,
            yerr=yerr,
            fmt="s",
            color="C2",
            capsize=6,
            markersize=7,
            zorder=4,
            label=label if position == 0 else None,
        )
        offsets = np.linspace(-0.12, 0.12, diffs.size) if diffs.size > 1 else np.zeros(1)
        ax.scatter(
            position + 0.22 + offsets,
            diffs,
            color="C7",
            s=14,
            zorder=3,
            label="per-fold differences" if position == 0 else None,
        )
        ax.annotate(
            comparison.verdict,
            (position, 1.0),
            xycoords=("data", "axes fraction"),
            ha="center",
            va="bottom",
            fontsize="x-small",
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(versus)), [name for name, _ in versus], rotation=20, ha="right")
    ax.set_xlim(-0.6, len(versus) - 0.3)
    ax.set_ylabel(f"{metric} minus {ref_name}")
    ax.set_title(f"difference to {ref_name}", fontsize="medium", pad=14)
    ax.grid(axis="y", alpha=0.3)


def comparison_plot(
    results: Sequence[dict[str, Any]],
    metric: str,
    path: Path,
    reference: str | None = None,
    confidence: float = CONFIDENCE,
) -> Path:
    """`comparison_figure` written as a PNG (no metadata, so reruns write the same bytes); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    comparison_figure(results, metric, reference, confidence).savefig(path, dpi=120, metadata={"Software": None})
    return path
