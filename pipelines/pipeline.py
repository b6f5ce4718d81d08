"""Flow `pipeline`: `dvc repro` in a project, retried on transient failures, ending with the report.

DVC decides what to rebuild (nothing, when nothing changed); the flow adds what a scheduler needs:
retries when a stage was killed or DVC's lock was busy (`pipelines.common.is_transient`), no retry
when a stage rejected its input (a params error fails at once, with the stage's message), the log
of every stage in Prefect, and the cross-validated report as the flow's result and as the run's
markdown artifact `pipeline-report` (`outputs/report/report.md`). `dvc repro` holds the checkout
(`pipelines.checkout_lock`): a second flow in the same checkout waits for it.

    python -m pipelines.pipeline --repo . [--target report] [--retries 2]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from pipelines.checkout_lock import checkout_lock
from pipelines.common import REPORT_METRICS, DvcError, describe, dvc_stream, project, read_json, run_cli
from pipelines.flow_run import announce_api, checkout_tags, tag_flow_run

REPORT_MARKDOWN = REPORT_METRICS.with_name("report.md")


def _retry_if_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry condition: only a `DvcError` that running again may fix."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, DvcError) and error.transient


@task(retry_condition_fn=_retry_if_transient)
def repro(repo: str, targets: list[str]) -> list[str]:
    """Run `dvc repro [targets]` in `repo`; returns the stages that ran (empty: all up to date)."""
    logger = get_run_logger()
    root = project(repo)
    with checkout_lock(root, log=logger):
        output = dvc_stream(root, "repro", *targets, echo=logger.info)
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


@flow(name="pipeline")
def pipeline(
    repo: str = ".", targets: list[str] | None = None, retries: int = 2, retry_delay_s: float = 30.0
) -> dict[str, Any] | None:
    """Bring the DVC pipeline of `repo` up to date and return its cross-validated report.

    Args:
        repo: the project folder (holding dvc.yaml and params.yaml).
        targets: stages to reproduce (default: the whole pipeline).
        retries: extra attempts after a transient failure (a killed stage, a busy DVC lock).
        retry_delay_s: seconds between attempts.

    Returns:
        The report's `metrics.json` (`{"test/mae": {"mean", "std", "folds"}, ...}`), or None when
        the targets stop before the report.

    Raises:
        DvcError: DVC failed and retrying could not help (or the retries ran out); the message ends
            with the failing stage's output.
    """
    logger = get_run_logger()
    announce_api(logger)
    root = project(repo)
    ran = repro.with_options(retries=retries, retry_delay_seconds=retry_delay_s)(str(root), targets or [])
    logger.info("stages run: %s", ", ".join(ran) if ran else "none (everything was up to date)")
    tag_flow_run(checkout_tags(root))
    summary = read_json(root / REPORT_METRICS)
    if summary is None:
        logger.warning("no report at %s (targets %s stop before it)", REPORT_METRICS, targets)
        return None
    logger.info("report: %s", describe(summary))
    if (root / REPORT_MARKDOWN).is_file():
        create_markdown_artifact(
            (root / REPORT_MARKDOWN).read_text(encoding="utf-8"),
            key="pipeline-report",
            description=f"{REPORT_MARKDOWN} of {root}: {describe(summary)}",
        )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the flow once, print the report as JSON."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=".", help="project folder (default: %(default)s)")
    parser.add_argument("--target", action="append", dest="targets", help="stage to reproduce (repeatable)")
    parser.add_argument("--retries", type=int, default=2, help="attempts after a transient failure")
    parser.add_argument("--retry-delay", type=float, default=30.0, help="seconds between attempts")
    return run_cli(parser, lambda a: pipeline(a.repo, a.targets, a.retries, a.retry_delay), argv)


if __name__ == "__main__":
    sys.exit(main())
