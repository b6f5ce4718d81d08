"""DVC stage `report`: mean and std across folds, a markdown table, and the change since last time.

Outputs:
    <out>/metrics.json      {"test/<metric>": {"mean", "std", "folds": [...]}, ...} (a DVC metric)
    <out>/report.md         the table, the median baseline, and the comparison with the metrics of
                            the last committed run (what `dvc metrics diff` shows, read from git),
                            only when that run was of the same dataset (`dataset` in metrics.json:
                            source, registered model name, data version)
    <out>/figures/cv_summary.png
The std is the sample standard deviation over folds (ddof=1), as papers report it.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from l2rclip.config import Params, load_params, model_name
from l2rclip.evaluation.plots import cv_summary_plot
from l2rclip.models.kinds import backbone_label, kind_of, least_clip
from l2rclip.stages.common import run_main, stage_parser, write_json
from l2rclip.tracking.runs import Tracker
from l2rclip.training.timings import read_seconds

log = logging.getLogger("l2rclip.stages.report")  # not __main__ under python -m

TABLE_METRICS = (
    "mae",
    "mae_index",
    "mae_argmax",
    "mae_argmax_index",
    "accuracy",
    "off_by_one_accuracy",
    "cs",
    "rmse",
    "qwk",
    "spearman",
    "ece",
    "ordinality",
    "ordinality_ordinalclip",
    "mae_median_baseline",
    "mae_median_baseline_index",
    "clap_epsilon",
)  # clap_epsilon: CLAP2015 lists only
PAPER_MAE_KEYS = {"value": "test/mae", "index": "test/mae_index"}  # eval.paper_mae -> report key
UNITS_NOTE = (
    "Units: `mae`, `mae_argmax`, `rmse`, `cs` and `mae_median_baseline` are in rank-VALUE units (the "
    "numbers of `ranks.values`: years for ages, 10 per decade for HCI); `*_index` are the same MAEs in "
    "rank-INDEX units (neighbouring ranks 1 apart), the unit of the HCI, Adience and aesthetics tables of "
    "the papers. `ordinality` is ours (similarity falls at every step away from each rank, both sides, "
    "diagonal step excluded); `ordinality_ordinalclip` is OrdinalCLIP's `vis_ordinality.py` (share of upward "
    "steps S[i,j] > S[i,j+1] with j >= i, diagonal step included, over all spans; per span in metrics.json)."
)


def summarise(per_fold: list[dict[str, Any]], prefix: str = "test/") -> dict[str, dict[str, Any]]:
    """Mean, std (ddof=1; 0 for one fold) and per-fold values of every numeric `prefix` metric."""
    keys = sorted({k for m in per_fold for k, v in m.items() if k.startswith(prefix) and isinstance(v, float)})
    summary = {}
    for key in keys:
        values = np.array([m[key] for m in per_fold if key in m], dtype=float)
        summary[key] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "folds": [float(v) for v in values],
        }
    return summary


def dataset_identity(params: Params, train_root: Path) -> dict[str, Any]:
    """Which dataset the report is of: source, registered model name (one per dataset), data version.

    The data version is the train stage's (`summary.json` of the first fold; None without it).
    """
    summary = train_root / str(params.folds[0]) / "train" / "summary.json"
    version = json.loads(summary.read_text(encoding="utf-8")).get("data_version") if summary.is_file() else None
    return {"source": params.data.source, "model_name": model_name(params), "data_version": version}


def not_comparable(previous: dict[str, Any], dataset: dict[str, Any]) -> str | None:
    """Why the committed report `previous` must not be compared with one of `dataset` (a sentence), or None.

    Reports of two datasets (another source or registered model name) differ by their data, not
    by what changed in the pipeline; a changed data version of the same dataset is compared.
    """
    before = previous.get("dataset")
    if not isinstance(before, dict):
        return "The committed report does not name its dataset (written by an older l2rclip); not compared."
    if (before.get("source"), before.get("model_name")) != (dataset["source"], dataset["model_name"]):
        return (
            f"The previous committed report is of another dataset (source {before.get('source')}, "
            f"{before.get('model_name')}; now source {dataset['source']}, {dataset['model_name']}); "
            "not compared."
        )
    return None


def previous_summary(path: Path) -> dict[str, Any] | None:
    """The report metrics as last committed to git (None when there are none)."""
    try:
        text = subprocess.run(
            ["git", "show", f"HEAD:{path.as_posix()}"], capture_output=True, text=True, check=True
        ).stdout
        return json.loads(text)
    except (subprocess.CalledProcessError, FileNotFoundError, json.JSONDecodeError):
        return None


def conformal_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The conformal interval table: test coverage against 1 - alpha in every fold, and mean width.

    A fold passes when its coverage is at least 1 - alpha - tolerance (`test/tolerance_<level>`:
    three standard errors of calibration and test sampling, l2rclip.evaluation.conformal.binomial_tolerance).
    """
    found = sorted(
        {
            (m.group(1), m.group(2))
            for key in summary
            if (m := re.fullmatch(r"test/coverage_([a-z]+)_([0-9.]+)", key))
        },
        key=lambda pair: (pair[0], -float(pair[1])),
    )
    if not found:
        return []
    lines = [
        "",
        "## Conformal prediction intervals (test split)",
        "",
        "Marginal coverage over the test images of each fold; the guarantee is coverage >= 1 - alpha "
        "on average over calibration and test draws, not per rank or per image.",
        "",
        "| method | level | coverage mean | coverage per fold | 1 - alpha - tolerance (min) | every fold ok "
        "| mean width (ranks) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, level in found:
        coverage, width = summary[f"test/coverage_{method}_{level}"], summary[f"test/width_{method}_{level}"]
        bounds = [float(level) / 100 - tol for tol in summary[f"test/tolerance_{level}"]["folds"]]
        ok = all(c >= b for c, b in zip(coverage["folds"], bounds, strict=True))
        folds = ", ".join(f"{v:.3f}" for v in coverage["folds"])
        lines.append(
            f"| {method} | {level} % | {coverage['mean']:.3f} | {folds} | {min(bounds):.3f} | "
            f"{'yes' if ok else 'NO'} | {width['mean']:.2f} |"
        )
    return lines


def zero_shot_lines(summary: dict[str, dict[str, Any]], header: dict[str, Any]) -> list[str]:
    """The trained model beside the same backbone zero-shot (the zero-shot@k stages), when there."""
    zero_shot = header.get("zero_shot")
    if not zero_shot:
        return []

    def cell(entry: dict[str, Any] | None) -> str:
        return "-" if entry is None else f"{entry['mean']:.3f} +- {entry['std']:.3f}"

    template, untrained = zero_shot["prompt_template"], zero_shot["summary"]
    rows = [
        (f'zero-shot, "{template}"', untrained.get("zero_shot/accuracy"), untrained.get("zero_shot/mae")),
        (f"trained (`{header['method']}`)", summary.get("test/accuracy"), summary.get("test/mae")),
    ]
    lines = [
        "",
        f"## Trained vs zero-shot, same backbone ({backbone_label(header) or 'CLIP'})",
        "",
        "| model | accuracy | MAE |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {cell(accuracy)} | {cell(mae)} |" for name, accuracy, mae in rows]
    return lines


def read_zero_shot(metrics_dir: Path, folds: Sequence[int]) -> dict[str, Any] | None:
    """The zero-shot@k results of every fold, summarised; None unless every fold has one."""
    files = [metrics_dir / f"zero_shot_{fold}.json" for fold in folds]
    if not all(f.is_file() for f in files):
        return None
    per_fold = [json.loads(f.read_text(encoding="utf-8")) for f in files]
    return {"prompt_template": per_fold[0]["prompt_template"], "summary": summarise(per_fold, "zero_shot/")}


def markdown(summary: dict, previous: dict | None, header: dict[str, Any]) -> str:
    """The report as markdown."""
    lines = [f"# Cross-validated results: {header['source']}", ""]
    if label := backbone_label(header):
        lines += [f"> **{label}**", ""]
    lines += [
        f"Method `{header['method']}`, backbone `{header['backbone']}`, {header['n_folds']} folds; "
        "mean +- std (ddof=1) over folds.",
        "",
        f"The papers of this protocol report MAE in {header['paper_mae_unit']} units: "
        f"`{header['paper_mae']}` is the number to compare with them.",
        "",
    ]
    if header.get("prediction_rule") == "threshold":
        lines += [
            "Hard predictions (and hence every MAE and accuracy here) use the published CORAL/CORN rule, "
            "the count of P(y > k) > 0.5 (`model.head_rule: threshold`).",
            "",
        ]
    lines += [UNITS_NOTE, "", "| metric | mean | std | per fold |", "|---|---|---|---|"]
    for name in TABLE_METRICS:
        entry = summary.get(f"test/{name}")
        if entry:
            folds = ", ".join(f"{v:.3f}" for v in entry["folds"])
            lines.append(f"| {name} | {entry['mean']:.4f} | {entry['std']:.4f} | {folds} |")
    mae, base = summary.get("test/mae"), summary.get("test/mae_median_baseline")
    if mae and base and base["mean"] > 0:
        gain = 1.0 - mae["mean"] / base["mean"]
        lines += [
            "",
            f"MAE (expectation) is {gain:.0%} below always predicting the training median "
            f"({mae['mean']:.3f} vs {base['mean']:.3f}).",
        ]
    lines += zero_shot_lines(summary, header)
    lines += conformal_lines(summary)
    lines += ["", "## Change since the last committed run", ""]
    if previous is None:
        lines.append("No committed report to compare with (first run, or outputs not committed).")
    elif (why_not := not_comparable(previous, header["dataset"])) is not None:
        lines.append(why_not)
    else:
        dataset, before = header["dataset"], previous["dataset"].get("data_version")
        if before != dataset["data_version"]:
            lines += [
                f"Same dataset ({dataset['model_name']}), other data: version {before} then, "
                f"{dataset['data_version']} now.",
                "",
            ]
        lines += ["| metric | before | now | change |", "|---|---|---|---|"]
        for name in TABLE_METRICS:
            key = f"test/{name}"
            if key in summary and isinstance(previous.get(key), dict):
                before, now = previous[key]["mean"], summary[key]["mean"]
                lines.append(f"| {name} | {before:.4f} | {now:.4f} | {now - before:+.4f} |")
    return "\n".join(lines) + "\n"


def report(params: Params, metrics_dir: Path, out_dir: Path, train_root: Path) -> dict[str, Any]:
    """Summarise the folds of `params.folds`; returns the summary written to metrics.json."""
    files = [metrics_dir / f"fold_{fold}.json" for fold in params.folds]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"expected the evaluate stage's metrics, missing: {', '.join(missing)}")
    per_fold = [json.loads(f.read_text(encoding="utf-8")) for f in files]
    summary = summarise(per_fold)
    header = {
        "source": params.data.source,
        "method": per_fold[0].get("method", "l2rclip"),
        "backbone": per_fold[0]["backbone"],
        "is_clip": all(m["is_clip"] for m in per_fold),
        "backbone_kind": least_clip(kind_of(m) for m in per_fold),
        "n_folds": len(per_fold),
        "paper_mae": PAPER_MAE_KEYS[params.eval.paper_mae],
        "paper_mae_unit": "rank-index" if params.eval.paper_mae == "index" else "rank-value",
        "prediction_rule": per_fold[0].get("prediction_rule", "argmax+expectation"),
        "dataset": dataset_identity(params, train_root),
    }
    if zero_shot := read_zero_shot(metrics_dir, params.folds):
        header["zero_shot"] = zero_shot
    metrics_file = out_dir / "metrics.json"
    previous = previous_summary(metrics_file)
    write_json(metrics_file, {**summary, **header})
    (out_dir / "report.md").write_text(markdown(summary, previous, header), encoding="utf-8")
    figure = cv_summary_plot(
        {k: v["folds"] for k, v in summary.items()},
        out_dir / "figures" / "cv_summary.png",
        metric_names=["test/mae", "test/accuracy"],
        folds=params.folds,
        baselines={"test/mae": summary["test/mae_median_baseline"]["folds"]},
        units={"test/mae": params.ranks.unit},
        title_suffix=backbone_label(header),
    )

    tracker, ids = Tracker.from_handle(train_root / str(params.folds[0]) / "train")
    parent = ids.get("parent_run_id")
    tracker.log_metrics(parent, {f"{k}_{stat}": v[stat] for k, v in summary.items() for stat in ("mean", "std")})
    seconds = [read_seconds(train_root / str(fold) / "train") for fold in params.folds]
    if all(s is not None for s in seconds):  # timings stay out of DVC's files (l2rclip.training.timings)
        tracker.log_metrics(parent, {"train_seconds": float(sum(s for s in seconds if s is not None))})
    for path in (out_dir / "report.md", metrics_file, figure):
        tracker.log_artifact(parent, path, "report")
    tracker.end_run(parent)
    log.info(
        "report: %s",
        ", ".join(
            f"{k} {v['mean']:.3f} +- {v['std']:.3f}"
            for k, v in summary.items()
            if k in ("test/mae", "test/accuracy")
        ),
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the stage (see `--help`)."""
    parser = stage_parser(
        "report",
        "Mean and std over folds of every test metric, a markdown report and the change "
        "since the last committed run.",
    )
    parser.add_argument(
        "--metrics-dir",
        type=Path,
        default=Path("outputs/metrics"),
        help="folder of the per-fold metrics fold_<k>.json (default: %(default)s)",
    )
    parser.add_argument(
        "--folds-dir",
        type=Path,
        default=Path("outputs/folds"),
        help="folder of the per-fold training outputs (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/report"), help="output folder (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    return run_main(lambda: report(load_params(args.params), args.metrics_dir, args.out, args.folds_dir) and 0)


if __name__ == "__main__":
    sys.exit(main())
