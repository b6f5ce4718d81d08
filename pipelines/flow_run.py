"""What a flow run tells Prefect beyond its logs: which server it reports to, tags, artifacts.

A flow started without `PREFECT_API_URL` runs against a temporary server Prefect starts for that
one call: its runs, artifacts and tags are gone when the call returns, and never appear in the
UI of a `prefect server start` the user may have open. Every flow therefore says at its start
where it reports (`announce_api`). Tags link a flow run to what it ran (`dvc-exp:<name>`,
`git:<commit>`, `data:<version>`); artifacts put its result where the run's page shows it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_API_URL

from l2rclip.tracking.provenance import data_version, git_commit
from pipelines.common import PREPARED

TEMPORARY_SERVER = (
    "a temporary local server (PREFECT_API_URL not set): this run will not appear in your UI; "
    "run `prefect server start` and export PREFECT_API_URL=http://127.0.0.1:4200/api"
)


def api_target() -> str:
    """The Prefect API this process reports to, in words."""
    return PREFECT_API_URL.value() or TEMPORARY_SERVER


def announce_api(logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Log which Prefect API the flow run reports to (called first in every flow)."""
    logger.info("reporting to the Prefect API at %s", api_target())


def tag_flow_run(tags: Iterable[str]) -> list[str]:
    """Add `tags` to the flow run in progress (a no-op outside one); returns its tags after.

    `prefect.tags(...)` only tags the runs created inside it; this run already exists.
    """
    context = FlowRunContext.get()
    wanted = [tag for tag in tags if tag]
    if context is None or context.flow_run is None or not wanted:
        return []
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(context.flow_run.id).tags
        merged = list(dict.fromkeys([*current, *wanted]))
        if merged != current:
            client.update_flow_run(context.flow_run.id, tags=merged)
    return merged


def checkout_tags(repo: Path) -> list[str]:
    """`git:<commit>` of the checkout and `data:<version>` of its prepared tables, where known.

    The data version is `l2rclip.stages.common.data_version`, the one the MLflow runs and model
    versions carry (`l2rclip.data_version`), so a flow run and its MLflow runs can be matched.
    """
    tags = []
    if commit := git_commit(repo):
        tags.append(f"git:{commit[:12]}")
    if all((repo / PREPARED / name).is_file() for name in ("images.csv", "splits.csv")):
        tags.append(f"data:{data_version(repo / PREPARED)}")
    return tags
