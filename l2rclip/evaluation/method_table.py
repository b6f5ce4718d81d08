"""The method study's report: a table and figures of every method by shots and under label shift, over seeds.

Input: one result per setting, as the study's run stage writes it (`l2rclip.stages.method_study`):
    {"setting": name, "spec": {"few_shot": k | None, "shift_keep": q | None, "shift_ranks": n | None},
     "ranks": RankSpace.to_dict(), "label": backbone caveat,
     "records": [{"method", "seed", "test/accuracy", "test/mae", ..., "n_train",
                  "ordinality_before", "ordinality_after", "prototypes": {"before", "after"}}, ...]}
Every number is a mean over seeds with its 95 % t-interval over seeds (`ablation_report.interval`:
the seeds draw the shots, the validation images and the initialisation; the test images are the
same for every seed, so the interval is about the training draw, not about the test sample).

Outputs (`write_report`): methods.md (accuracy and MAE tables, the prototypes' ordinality),
summary.json (the numbers behind them), figures/methods.png (accuracy and MAE against shots with
CI bands, and the label-shift settings) and figures/prototypes.png (similarity matrices before and
after training). PNGs carry no metadata, so the same results give the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from l2rclip.evaluation.ablation_report import CONFIDENCE, interval
from l2rclip.evaluation.plots import prototype_similarity_grid
from l2rclip.metrics import lower_is_better
from l2rclip.ranks import RankSpace

METRICS = {"test/accuracy": "accuracy", "test/mae": "MAE (expectation rule, counts)"}
MARKERS = "osD^vP*Xhp"


def setting_kind(spec: dict[str, Any]) -> str:
    """`shots` (k per rank), `shift` (label shift) or `all` (the whole pool)."""
    if spec.get("few_shot") is not None:
        return "shots"
    return "shift" if spec.get("shift_keep") is not None else "all"


def stats(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean, the t-interval over seeds (None with one seed) and the values."""
    ci = interval(values, confidence)
    return {
        "mean": float(np.mean(values)),
        "ci": None if ci is None else [float(ci[0]), float(ci[1])],
        "n": len(values),
        "values": [float(v) for v in values],
    }


def summarize(results: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{setting: {method: {metric: stats}}} for the metrics of METRICS and the prototypes' ordinality.

    Raises:
        ValueError: a method of `methods` has no record in a setting (a run that did not happen
            must not look like a result).
    """
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for result in results:
        by_method: dict[str, dict[str, Any]] = {}
        for method in methods:
            records = [r for r in result["records"] if r["method"] == method]
            if not records:
                raise ValueError(f"setting {result['setting']!r}: no record of method {method!r}")
            keys = [*METRICS, "ordinality_before", "ordinality_after"]
            by_method[method] = {key: stats([r[key] for r in records]) for key in keys if key in records[0]}
            by_method[method]["n_train"] = stats([r["n_train"] for r in records])
        summary[result["setting"]] = by_method
    return summary


def _cell(entry: dict[str, Any], best: bool) -> str:
    """'0.781 ± 0.016' (half-width of the 95 % CI), bold when best; '0.781 (1 seed)' without spread."""
    text = f"{entry['mean']:.3f}"
    if entry["ci"] is not None:
        text += f" ± {(entry['ci'][1] - entry['ci'][0]) / 2:.3f}"
    else:
        text += f" ({entry['n']} seed)"
    return f"**{text}**" if best else text


def _column_title(result: dict[str, Any], summary: dict[str, Any]) -> str:
    spec, kind = result["spec"], setting_kind(result["spec"])
    if kind == "shots":
        return f"{spec['few_shot']} shot{'s' if spec['few_shot'] != 1 else ''}"
    per_rank = next(iter(summary.values()))["n_train"]["mean"] / len(result["ranks"]["labels"])
    if kind == "all":
        return f"all ({per_rank:.0f}/rank)"
    return f"label shift ({spec['shift_keep']:g} of {spec.get('shift_ranks') or 'half the'} ranks)"


def method_table(results: Sequence[dict[str, Any]], methods: Sequence[str], names: dict[str, str]) -> str:
    """Markdown: per metric a table of methods (rows) by settings (columns), then the ordinality table."""
    summary = summarize(results, methods)
    titles = [_column_title(result, summary[result["setting"]]) for result in results]
    seeds = sorted({r["seed"] for result in results for r in result["records"]})
    lines = []
    for metric, label in METRICS.items():
        direction = "lower" if lower_is_better(metric) else "higher"
        lines += [
            f"**Test {label}** ({direction} is better; mean ± half-width of the {CONFIDENCE:.0%} t-interval "
            f"over {len(seeds)} seeds; bold: best mean of the column)",
            "",
            "| method | " + " | ".join(titles) + " |",
            "|---" * (len(titles) + 1) + "|",
        ]
        for method in methods:
            cells = []
            for result in results:
                column = summary[result["setting"]]
                means = [column[m][metric]["mean"] for m in methods]
                best = min(means) if lower_is_better(metric) else max(means)
                cells.append(_cell(column[method][metric], column[method][metric]["mean"] == best))
            lines.append(f"| {names.get(method, method)} | " + " | ".join(cells) + " |")
        lines.append("")
    prompt_methods = [m for m in methods if "ordinality_after" in summary[results[0]["setting"]][m]]
    if prompt_methods:
        lines += [
            "**Prototype ordinality** before -> after training (`l2rclip.metrics.prototype_ordinality`; "
            "mean over seeds)",
            "",
            "| method | " + " | ".join(titles) + " |",
            "|---" * (len(titles) + 1) + "|",
        ]
        for method in prompt_methods:
            cells = [
                f"{summary[r['setting']][method]['ordinality_before']['mean']:.3f} -> "
                f"{summary[r['setting']][method]['ordinality_after']['mean']:.3f}"
                for r in results
            ]
            lines.append(f"| {names.get(method, method)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _band(
    ax: Axes, x: Sequence[float], entries: Sequence[dict[str, Any]], style: dict[str, Any], label: str
) -> None:
    """A method's means as a line with markers and its CIs as a shaded band."""
    means = [e["mean"] for e in entries]
    ax.plot(x, means, label=label, **style)
    if all(e["ci"] is not None for e in entries):
        ax.fill_between(
            x, [e["ci"][0] for e in entries], [e["ci"][1] for e in entries], color=style["color"], alpha=0.15
        )


def methods_figure(
    results: Sequence[dict[str, Any]], methods: Sequence[str], names: dict[str, str], caveat: str = ""
) -> Figure:
    """Accuracy and MAE against training images per rank (log axis; shots and all), and under label shift."""
    summary = summarize(results, methods)
    curve = sorted(
        (r for r in results if setting_kind(r["spec"]) != "shift"),
        key=lambda r: summary[r["setting"]][methods[0]]["n_train"]["mean"],
    )
    shifted = [r for r in results if setting_kind(r["spec"]) == "shift"]
    per_rank = [summary[r["setting"]][methods[0]]["n_train"]["mean"] / len(r["ranks"]["labels"]) for r in curve]
    fig = Figure(figsize=(11.5 if shifted else 8.5, 7.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(
        len(METRICS), 2 if shifted else 1, squeeze=False, width_ratios=[3, 1.3] if shifted else None
    )
    for row, (metric, label) in enumerate(METRICS.items()):
        ax = axes[row][0]
        for index, method in enumerate(methods):
            style = {
                "color": f"C{index}",
                "marker": MARKERS[index % len(MARKERS)],
                "markersize": 5,
                "linewidth": 1.4,
            }
            _band(
                ax,
                per_rank,
                [summary[r["setting"]][method][metric] for r in curve],
                style,
                names.get(method, method),
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(per_rank, [_tick(r, n) for r, n in zip(curve, per_rank, strict=True)])
        ax.minorticks_off()
        ax.set_xlabel("training images per rank (validation: as many, from the same pool)")
        ax.set_ylabel(f"test {label}")
        ax.grid(alpha=0.3)
        if shifted:
            _shift_panel(axes[row][1], shifted, summary, methods, names, metric)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize="small")
    fig.suptitle(
        "Methods on the shifted demo task: mean and 95 % CI over seeds" + (f"\n{caveat}" if caveat else ""),
        fontsize="medium",
    )
    return fig


def _tick(result: dict[str, Any], per_rank: float) -> str:
    return f"{per_rank:.0f}" if setting_kind(result["spec"]) == "shots" else f"all\n({per_rank:.0f})"


def _shift_panel(
    ax: Axes,
    shifted: Sequence[dict[str, Any]],
    summary: dict[str, Any],
    methods: Sequence[str],
    names: dict[str, str],
    metric: str,
) -> None:
    """Per label-shift setting, each method's mean with its CI as an error bar."""
    width = 0.8 / len(methods)
    for position, result in enumerate(shifted):
        for index, method in enumerate(methods):
            entry = summary[result["setting"]][method][metric]
            x = position - 0.4 + width * (index + 0.5)
            yerr = (
                None
                if entry["ci"] is None
                else [[entry["mean"] - entry["ci"][0]], [entry["ci"][1] - entry["mean"]]]
            )
            ax.errorbar(
                x, entry["mean"], yerr=yerr, fmt=MARKERS[index % len(MARKERS)], color=f"C{index}", capsize=3
            )
    ax.set_xticks(
        range(len(shifted)),
        [
            f"keep {r['spec']['shift_keep']:g} of\n{r['spec'].get('shift_ranks') or 'half the'} ranks"
            for r in shifted
        ],
    )
    ax.set_xlim(-0.6, len(shifted) - 0.4)
    ax.set_title("label shift (test: every rank alike)", fontsize="medium")
    ax.grid(axis="y", alpha=0.3)


def prototype_panels(
    results: Sequence[dict[str, Any]], methods: Sequence[str], names: dict[str, str]
) -> list[tuple[str, np.ndarray]]:
    """(title, prototypes) before and after training of each qualitative method, whole pool, first seed."""
    chosen = next((r for r in results if setting_kind(r["spec"]) == "all"), results[0])
    panels = []
    for method in methods:
        records = sorted(
            (r for r in chosen["records"] if r["method"] == method and "prototypes" in r), key=lambda r: r["seed"]
        )
        if records:
            first = records[0]
            for moment in ("before", "after"):
                title = f"{names.get(method, method)}, {moment} training (seed {first['seed']})"
                panels.append((title, np.asarray(first["prototypes"][moment])))
    return panels


def write_report(
    results: Sequence[dict[str, Any]], methods: Sequence[str], out_dir: Path, names: dict[str, str] | None = None
) -> dict[str, Path]:
    """methods.md, summary.json and the figures into `out_dir`; returns their paths by name."""
    names = names or {}
    if not results:
        raise ValueError("method study report: expected the results of at least one setting, found none")
    caveat = next((r["label"] for r in results if r.get("label")), "")
    out_dir.mkdir(parents=True, exist_ok=True)
    table = method_table(results, methods, names)
    paths = {"table": out_dir / "methods.md", "summary": out_dir / "summary.json"}
    paths["table"].write_text(table + (f"\n> **{caveat}**\n" if caveat else ""), encoding="utf-8")
    summary = {"label": caveat, "confidence": CONFIDENCE, "settings": summarize(results, methods)}
    paths["summary"].write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    paths["figure"] = out_dir / "figures" / "methods.png"
    paths["figure"].parent.mkdir(parents=True, exist_ok=True)
    methods_figure(results, methods, names, caveat).savefig(paths["figure"], dpi=130, metadata={"Software": None})
    panels = prototype_panels(results, methods, names)
    if panels:
        paths["prototypes"] = prototype_similarity_grid(
            panels,
            RankSpace.from_dict(results[0]["ranks"]),
            out_dir / "figures" / "prototypes.png",
            title="Rank-prototype similarity before and after training (whole pool)",
            title_suffix=caveat,
        )
    return paths
