"""Flow `folds`: one experiment's folds on N machines, then its cross-validated summary.

`dvc exp run -n NAME -S ...` trains every fold of `folds` in one process after another. With a
Prefect work pool (see `pipelines.fanout` and docs/mlops.md, "Team set-up"), this flow
runs each fold `k` as its own experiment `NAME-fold<k>` (the same settings plus `folds=[k]`) on
whichever worker is free, pulls them back, and summarises the folds exactly as the report stage
does (`l2rclip.stages.report.summarise`: mean, std with ddof=1, per-fold values):

    python -m pipelines.folds --work-pool l2rclip --name fgnet-5fold -S data.source=fgnet ...

The folds are `folds` from the commit's params.yaml, or a `-S folds=[...]` given here. Like the
other flows it holds the checkout (`pipelines.checkout_lock`) while it removes, pulls and reads
experiments, so a scheduled retrain in the same checkout waits for it; its flow run is tagged
`git:<commit>` and `dvc-exp:<name>-fold<k>`, and the summary is its markdown artifact `folds-summary`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from l2rclip.config import load_params
from l2rclip.stages.report import summarise
from l2rclip.tracking.runs import tag_experiment_commits
from pipelines.ablation import NO_REGISTER, collect
from pipelines.checkout_lock import checkout_lock
from pipelines.common import describe, project, run_cli, tracking_uri
from pipelines.fanout import fan_out
from pipelines.flow_run import announce_api, checkout_tags, tag_flow_run


def fold_runs(name: str, settings: Sequence[str], default_folds: Sequence[int]) -> list[tuple[str, list[str]]]:
    """`(NAME-fold<k>, settings + folds=[k])` for each fold of `-S folds=...` or else `default_folds`.

    A fold's experiment is a piece of one, so it registers no model (`NO_REGISTER` first: a
    `tracking.register=true` in `settings` still wins).
    """
    chosen, kept = list(default_folds), []
    for setting in settings:
        key, _, value = setting.partition("=")
        if key.strip() != "folds":
            kept.append(setting)
            continue
        chosen = yaml.safe_load(value)
        if not isinstance(chosen, list) or not all(isinstance(k, int) for k in chosen):
            raise ValueError(f"folds: expected a list of fold numbers such as folds=[0,1], found {setting!r}")
    if not chosen:
        raise ValueError("folds: expected at least one fold, found none")
    return [(f"{name}-fold{k}", [NO_REGISTER, *kept, f"folds=[{k}]"]) for k in chosen]


def combine(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One cross-validated summary from one-fold reports (experiment name -> its metrics.json).

    Raises:
        ValueError: a report does not hold exactly one fold.
    """
    per_fold = []
    for name, summary in summaries.items():
        entries = {key: entry for key, entry in summary.items() if isinstance(entry, dict) and "folds" in entry}
        if counts := sorted({len(entry["folds"]) for entry in entries.values()} - {1}):
            raise ValueError(f"{name}: expected a report of one fold, found {counts[0]} folds")
        per_fold.append({key: float(entry["folds"][0]) for key, entry in entries.items()})
    combined: dict[str, Any] = summarise(per_fold)
    flags = {summary.get("is_clip") for summary in summaries.values()}
    if len(flags) == 1 and None not in flags:
        combined["is_clip"] = flags.pop()
    return combined


@flow(name="folds")
def folds(
    work_pool: str, name: str, settings: list[str] | None = None, repo: str = ".", git_remote: str = "origin"
) -> dict[str, Any]:
    """Run each fold of one experiment as its own experiment on the workers of `work_pool`.

    Args:
        work_pool: the Prefect process work pool (deployment `experiment/<work_pool>`).
        name: the experiment's name; fold k runs as `<name>-fold<k>`.
        settings: `key=value` params overrides for every fold (`dvc exp run -S`).
        repo: the project folder (its HEAD commit must be on `git_remote`).
        git_remote: the git remote the workers fetch from and push to.

    Returns:
        `summary` (as the report's metrics.json), `experiments` (one per fold) and `runs`.

    Raises:
        RuntimeError: some folds did not finish (after all others have).
    """
    logger = get_run_logger()
    announce_api(logger)
    root = project(repo)
    runs = fold_runs(name, settings or [], load_params(root / "params.yaml").folds)
    tag_flow_run([*checkout_tags(root), *(f"dvc-exp:{run_name}" for run_name, _ in runs)])
    with checkout_lock(root, log=logger):  # removes, pulls and reads experiments in this checkout
        results = fan_out(root, runs, work_pool, tracking_uri(root), git_remote)
        if failed := [f"{r['name']}: {r['state']} {r['message']}" for r in results if not r["completed"]]:
            raise RuntimeError(
                f"folds: {len(failed)} of {len(runs)} fold runs did not finish: {'; '.join(failed)}"
            )
        found = {run_name: (entry or {}).get("summary") for run_name, entry in collect(root).items()}
        tag_experiment_commits(root, tracking_uri(root))  # the fold experiments' commits: l2rclip.dvc_exp_commit
    if missing := [run_name for run_name, _ in runs if not found.get(run_name)]:
        raise RuntimeError(f"folds: no report in the experiments {', '.join(missing)} (see `dvc exp show`)")
    summary = combine({run_name: found[run_name] for run_name, _ in runs})
    logger.info("%s over %d folds on %s: %s", name, len(runs), work_pool, describe(summary))
    create_markdown_artifact(
        summary_markdown(name, summary, [run_name for run_name, _ in runs]),
        key="folds-summary",
        description=f"{name} over {len(runs)} folds: {describe(summary)}",
    )
    return {"summary": summary, "experiments": [run_name for run_name, _ in runs], "runs": results}


def summary_markdown(name: str, summary: dict[str, Any], experiments: Sequence[str]) -> str:
    """The cross-validated summary as a markdown table: metric, mean +- std, one column per fold."""
    metrics = sorted(key for key, entry in summary.items() if isinstance(entry, dict) and "folds" in entry)
    header = ["metric", "mean +- std", *experiments]
    lines = [
        f"# {name}: {len(experiments)} folds",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for metric in metrics:
        entry = summary[metric]
        lines.append(
            f"| {metric} | {entry['mean']:.4f} +- {entry['std']:.4f} | "
            + " | ".join(f"{value:.4f}" for value in entry["folds"])
            + " |"
        )
    if "is_clip" in summary:
        lines += ["", f"CLIP weights: {summary['is_clip']}"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the folds once, print the summary as JSON."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.folds", description=__doc__.split("\n")[0])
    parser.add_argument("--work-pool", required=True, help="Prefect process work pool the workers serve")
    parser.add_argument("--name", required=True, help="experiment name; fold k runs as NAME-fold<k>")
    parser.add_argument(
        "-S",
        "--set-param",
        action="append",
        dest="settings",
        default=[],
        help="key=value params override for every fold (repeatable, as dvc exp run -S)",
    )
    parser.add_argument("--repo", default=".", help="project folder (default: %(default)s)")
    parser.add_argument("--git-remote", default="origin", help="git remote of the workers (default: %(default)s)")
    return run_cli(parser, lambda a: folds(a.work_pool, a.name, a.settings, a.repo, a.git_remote), argv)


if __name__ == "__main__":
    sys.exit(main())
