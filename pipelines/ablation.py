"""Flow `ablation`: a grid of params variants as DVC experiments, compared across folds.

Each variant is one `dvc exp run --queue -n <name> -S key=value ...`; the queue then runs with
`dvc exp run --run-all --jobs N` (each experiment in its own temporary copy of the project, so
variants can run side by side and the workspace is left as it was) and the flow waits for it.
Metrics come back from `dvc exp show --json` (the report's `metrics.json` of every experiment);
`dvc exp apply <name>` brings a variant's outputs into the workspace. With `--work-pool NAME`
the variants run instead on the workers of a Prefect work pool, one machine each, and come back
through the shared git and DVC remotes (`pipelines.fanout`); the comparison is the same.

Variants register no model: every variant runs with `-S tracking.register=false` (on the local
queue and on the work pool alike), so its `register` stage records "not registered" and the
registry holds only the models of the pipeline's own runs (`dvc repro`, the retrain flow).

Every MLflow run of a variant (the pipeline's parent run and its fold runs) gets the tag
`l2rclip.variant=<name>`: a variant's runs are those whose `l2rclip.pipeline_key` equals the key
the train stage computes from that variant's params and the run's data version.

The flow run is tagged `dvc-exp:<name>` for each variant and publishes the comparison as its
artifacts `ablation-comparison` (the markdown table) and `ablation-variants` (a table artifact,
one row per variant). Queueing, running and collecting the experiments hold the checkout
(`pipelines.checkout_lock`).

The default grid is RankFormer on/off x cop loss on/off; named axes add plain vs interpolated
prompts and one- vs two-stage training, and any params key can be given.

    python -m pipelines.ablation --repo . --axis rankformer --axis cop --set folds=[0,1] --jobs 2
    python -m pipelines.ablation --grid model.prompt.n_base=2,3,5
    python -m pipelines.ablation --work-pool l2rclip     # one run per variant on N machines (fanout.py)

Quirks (DVC 3.67): queued experiments contain the last commit plus uncommitted changes to tracked
files, never untracked files, so commit new code first; `--run-all` also runs anything queued
before; a queue worker can miss the queue's shutdown and is then stopped here (`pipelines.dvc_queue`);
a fresh MLflow SQLite store is created once here, because parallel stage processes
creating it at the same time collide (`duplicate column name`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from l2rclip.config import Params, from_dict, to_flat_dict
from l2rclip.evaluation.ablation_report import comparison_plot, comparison_table
from l2rclip.tracking.provenance import pipeline_key
from l2rclip.tracking.runs import PARENT_TAG, PIPELINE_KEY_TAG, tag_experiment_commits
from pipelines.checkout_lock import checkout_lock
from pipelines.common import REPORT_METRICS, dvc_output, dvc_stream, project, run_cli, tracking_uri
from pipelines.dvc_queue import stop_stranded_workers
from pipelines.fanout import fan_out
from pipelines.flow_run import announce_api, checkout_tags, tag_flow_run

AXES: dict[str, dict[str, list[Any]]] = {
    "rankformer": {"model.rankformer.enabled": [True, False]},
    "cop": {"loss.cop": [1.0, 0.0]},
    "prompt": {"model.prompt.interpolation": ["linear", "plain"]},
    "schedule": {"train.schedule": ["one_stage", "two_stage"]},
}
DEFAULT_GRID = {**AXES["rankformer"], **AXES["cop"]}
OUT_DIR = Path("outputs/ablation")  # git-ignored: rewritten from `dvc exp show` on every run (ablation_report)
NO_REGISTER = "tracking.register=false"  # variants are compared, not served: they register no model
VARIANT_TAG = "l2rclip.variant"


@dataclass(frozen=True)
class Variant:
    """One point of the grid: an experiment name and the params it sets."""

    name: str
    overrides: dict[str, Any]


def _label(key: str, value: Any) -> str:
    """`model.rankformer.enabled`, False -> `rankformer-off`; `loss.cop`, 0.0 -> `cop-0`."""
    parts = key.split(".")
    field = parts[-2] if parts[-1] == "enabled" and len(parts) > 1 else parts[-1]
    shown = (
        {True: "on", False: "off"}.get(value)
        if isinstance(value, bool)
        else (f"{value:g}" if isinstance(value, float) else str(value))
    )
    return re.sub(r"[^\w.-]", "_", f"{field}-{shown}")  # a valid git ref (DVC names experiments by refs)


def expand(grid: dict[str, list[Any]]) -> list[Variant]:
    """Every combination of the grid's values, in the order given (the first is the reference)."""
    if not grid or any(not values for values in grid.values()):
        raise ValueError(f"ablation grid: expected params keys with at least one value each, found {grid!r}")
    variants = [
        Variant(
            "_".join(_label(k, v) for k, v in zip(grid, values, strict=True)), dict(zip(grid, values, strict=True))
        )
        for values in itertools.product(*grid.values())
    ]
    names = [variant.name for variant in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"ablation grid: variant names collide ({', '.join(names)}); use distinct values")
    return variants


def variant_settings(overrides: dict[str, Any], extra: Sequence[str]) -> list[str]:
    """`key=value` settings for `dvc exp run -S`: `NO_REGISTER`, the variant's, then `extra`.

    Values are JSON, which DVC's parser reads as YAML. Later settings win, so `extra` can turn
    registration back on (`--set tracking.register=true`) when a variant is meant to be served.
    """
    return [NO_REGISTER, *(f"{key}={json.dumps(value)}" for key, value in overrides.items()), *extra]


def _set_params(overrides: dict[str, Any], extra: Sequence[str]) -> list[str]:
    """`-S key=value` arguments (see `variant_settings`)."""
    return [argument for setting in variant_settings(overrides, extra) for argument in ("-S", setting)]


@task
def queue_variants(repo: Path, variants: list[Variant], extra: list[str]) -> None:
    """Queue one DVC experiment per variant, replacing earlier experiments of the same names."""
    logger = get_run_logger()
    existing = set(dvc_output(repo, "exp", "list", "--name-only").split())
    if again := sorted(existing & {variant.name for variant in variants}):
        logger.info("replacing earlier experiments %s", ", ".join(again))
        dvc_output(repo, "exp", "remove", *again)
    for variant in variants:
        dvc_output(repo, "exp", "run", "--queue", "-n", variant.name, *_set_params(variant.overrides, extra))
        logger.info("queued %s: %s", variant.name, variant.overrides)


@task
def run_queue(repo: Path, jobs: int) -> None:
    """Run the queued experiments, `jobs` at a time, and wait until all have finished."""
    uri = tracking_uri(repo)
    if uri.startswith("sqlite:"):
        MlflowClient(uri).search_experiments(max_results=1)  # create the store before parallel stages do
    logger = get_run_logger()
    dvc_stream(repo, "exp", "run", "--run-all", "--jobs", str(jobs), echo=logger.info)
    if stopped := stop_stranded_workers(repo):
        logger.warning(
            "stopped %d DVC queue worker(s) left running after the queue emptied (pids %s; pipelines.dvc_queue)",
            len(stopped),
            ", ".join(map(str, stopped)),
        )


@task
def collect(repo: Path) -> dict[str, dict[str, Any]]:
    """Params and report metrics of the experiments on the current commit, by experiment name.

    `dvc exp show --json` names the experiments and their commits, but drops list values from
    metrics (the per-fold values); the report is committed in each experiment's commit (it is a
    `cache: false` metric), so it is read from there with git.
    """
    found = {}
    for baseline in json.loads(dvc_output(repo, "exp", "show", "--json")):
        for experiment in baseline.get("experiments") or []:
            rev = experiment["revs"][0]
            params = ((rev.get("data") or {}).get("params") or {}).get("params.yaml", {}).get("data", {})
            summary = _committed_json(repo, rev["rev"], REPORT_METRICS)
            found[experiment["name"]] = {"params": params, "summary": summary}
    return found


def _committed_json(repo: Path, rev: str, path: Path) -> dict[str, Any] | None:
    """The JSON file `path` as committed in `rev`, or None when it is not there."""
    done = subprocess.run(
        ["git", "show", f"{rev}:{path.as_posix()}"], cwd=repo, capture_output=True, text=True, check=False
    )
    return json.loads(done.stdout) if done.returncode == 0 else None


@task
def tag_variant_runs(uri: str, name: str, raw_params: dict[str, Any]) -> int:
    """Tag the MLflow runs of the variant `name` (parent and fold runs); returns how many."""
    params = from_dict(Params, raw_params)
    if not params.tracking.enabled:
        return 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    if experiment is None:
        return 0
    flat = to_flat_dict(params)
    parents = [
        run
        for run in client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`{PIPELINE_KEY_TAG}` LIKE '%'"
        )
        if run.data.tags[PIPELINE_KEY_TAG] == pipeline_key(flat, run.data.tags.get("l2rclip.data_version"))
    ]
    runs = parents + [
        child
        for parent in parents
        for child in client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
        )
    ]
    for run in runs:
        client.set_tag(run.info.run_id, VARIANT_TAG, name)
    return len(runs)


@flow(name="ablation")
def ablation(
    repo: str = ".",
    grid: dict[str, list[Any]] | None = None,
    extra: list[str] | None = None,
    jobs: int = 1,
    metric: str = "test/mae",
    work_pool: str | None = None,
    git_remote: str = "origin",
    reference: str | None = None,
) -> dict[str, Any]:
    """Run every variant of `grid` as a DVC experiment and compare `metric` across folds.

    Args:
        repo: the project folder (a git repository with a commit; see the module's quirks).
        grid: params key -> values; every combination is a variant (default: RankFormer on/off x
            cop on/off, see `AXES` for the named axes).
        extra: `key=value` settings applied to every variant (e.g. `folds=[0,1]`).
        jobs: experiments run at the same time (the local queue).
        metric: the report metric compared (a key of `outputs/report/metrics.json`).
        work_pool: instead of the local queue, run each variant on a worker of this Prefect work
            pool (`pipelines.fanout`): the commit must be on `git_remote`, and the tracking URI a
            server every worker reaches.
        git_remote: the git remote the workers fetch from and push their experiments to.
        reference: the variant every other one is compared with, paired over folds (default: the
            first of the grid; `l2rclip.evaluation.ablation_report`).

    Returns:
        `table` (markdown, also in `outputs/ablation/ablation.md`), `plot` (the PNG's path),
        `variants` (name, overrides, the metric's mean/std/folds), `tagged` (MLflow runs tagged),
        and with a work pool `runs` (each variant's flow run: state, message, id).

    Raises:
        RuntimeError: some variants produced no report (after the table and plot of the others
            are written); DvcError: a DVC command failed.
    """
    logger = get_run_logger()
    announce_api(logger)
    root = project(repo)
    variants = expand(grid or DEFAULT_GRID)
    if reference is not None and reference not in {v.name for v in variants}:
        raise ValueError(
            f"ablation --reference: expected one of {', '.join(v.name for v in variants)}, found {reference!r}"
        )
    tag_flow_run([*checkout_tags(root), *(f"dvc-exp:{v.name}" for v in variants)])
    uri = tracking_uri(root)
    runs = None
    with checkout_lock(root, log=logger):
        if work_pool:
            settings = [(v.name, variant_settings(v.overrides, extra or [])) for v in variants]
            runs = fan_out(root, settings, work_pool, uri, git_remote)
        else:
            queue_variants(root, variants, list(extra or []))
            run_queue(root, jobs)
        found = collect(root)
        tag_experiment_commits(root, uri)  # the experiments' commits exist now: l2rclip.dvc_exp_commit
    results = [
        {
            "name": v.name,
            "overrides": v.overrides,
            "summary": found.get(v.name, {}).get("summary"),
            "folds": found.get(v.name, {}).get("params", {}).get("folds"),
        }
        for v in variants
    ]
    tagged = sum(tag_variant_runs(uri, v.name, found[v.name]["params"]) for v in variants if v.name in found)
    table = comparison_table(results, metric, reference)
    (root / OUT_DIR).mkdir(parents=True, exist_ok=True)
    (root / OUT_DIR / "ablation.md").write_text(table, encoding="utf-8")
    plot = comparison_plot(results, metric, root / OUT_DIR / "ablation.png", reference)
    publish_comparison(results, metric, table)
    logger.info(
        "ablation of %d variants (%d MLflow runs tagged %s):\n%s", len(variants), tagged, VARIANT_TAG, table
    )
    failed = [result["name"] for result in results if not (result["summary"] or {}).get(metric)]
    if failed:
        where = (
            "`dvc queue status` and `dvc queue logs <name>`"
            if runs is None
            else "; ".join(f"{r['name']}: {r['state']} {r['message']}" for r in runs if not r["completed"])
            or "the flow runs' logs"
        )
        raise RuntimeError(
            f"ablation: no {metric} for {', '.join(failed)} (failed experiments; see {where}); "
            f"the others are in {OUT_DIR}"
        )
    return {
        "table": table,
        "plot": str(plot),
        "tagged": tagged,
        "variants": [
            {"name": r["name"], "overrides": r["overrides"], metric: r["summary"][metric]} for r in results
        ],
        **({"runs": runs} if runs is not None else {}),
    }


def variant_rows(results: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One row per variant for the table artifact: its settings and `metric` (empty when it failed)."""
    keys = list(dict.fromkeys(key for result in results for key in result["overrides"]))
    rows = []
    for result in results:
        entry = (result["summary"] or {}).get(metric)
        entry = entry if isinstance(entry, dict) else {}
        rows.append(
            {
                "variant": result["name"],
                **{key: result["overrides"].get(key) for key in keys},
                "mean": entry.get("mean"),
                "std": entry.get("std"),
                "folds": entry.get("folds"),
                "status": "ok" if entry else "failed",
            }
        )
    return rows


def publish_comparison(results: Sequence[dict[str, Any]], metric: str, table: str) -> None:
    """The comparison as the flow run's artifacts: the markdown table and one table row per variant."""
    create_markdown_artifact(table, key="ablation-comparison", description=f"ablation of {metric}")
    create_table_artifact(
        variant_rows(results, metric),
        key="ablation-variants",
        description=f"{metric} of each variant across folds",
    )


def _grid(args: argparse.Namespace) -> dict[str, list[Any]] | None:
    """The grid from `--axis` names and `--grid key=v1,v2` options (values parsed as YAML)."""
    grid: dict[str, list[Any]] = {}
    for axis in args.axes or []:
        grid.update(AXES[axis])
    for option in args.grid or []:
        key, _, values = option.partition("=")
        if not values:
            raise SystemExit(f"--grid: expected key=value1,value2,..., found {option!r}")
        grid[key] = [yaml.safe_load(value) for value in values.split(",")]
    return grid or None


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the ablation once, print its result as JSON."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.ablation", description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=".", help="project folder (default: %(default)s)")
    parser.add_argument(
        "--axis",
        action="append",
        dest="axes",
        choices=sorted(AXES),
        help="a named axis of the grid (repeatable; default: rankformer and cop)",
    )
    parser.add_argument("--grid", action="append", help="an axis as key=value1,value2 (repeatable)")
    parser.add_argument(
        "--set",
        action="append",
        dest="extra",
        help="key=value for every variant (repeatable); variants register no model unless "
        "--set tracking.register=true",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="experiments at a time in the local DVC queue (default: %(default)s)"
    )
    parser.add_argument("--metric", default="test/mae", help="report metric compared (default: %(default)s)")
    parser.add_argument(
        "--work-pool",
        help="run each variant on a worker of this Prefect work pool instead "
        "of the local queue (deployment experiment/<pool>, see pipelines.fanout)",
    )
    parser.add_argument(
        "--git-remote",
        default="origin",
        help="git remote the workers fetch from and push to (default: %(default)s)",
    )
    parser.add_argument("--reference", help="variant the others are compared with (default: the grid's first)")
    return run_cli(
        parser,
        lambda a: ablation(a.repo, _grid(a), a.extra, a.jobs, a.metric, a.work_pool, a.git_remote, a.reference),
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
