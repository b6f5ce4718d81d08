"""Serve the `retrain` flow on a cron schedule: nightly "retrain and promote if better".

A served deployment needs a real Prefect server (the temporary one a plain flow call starts lives
only as long as that call, and keeps no schedules):

    prefect server start                                    # terminal 1 (or a shared server)
    export PREFECT_API_URL=http://127.0.0.1:4200/api        # terminal 2
    python -m pipelines.deploy --repo . --cron "0 3 * * *" --margin 0.05

This process is the runner: it registers the deployment with its schedule, then polls the
server and runs each scheduled (or manually started: `prefect deployment run retrain/<name>`)
flow run in a subprocess, until stopped with Ctrl+C. The flow is referenced by module path
(`pipelines.retrain.retrain`), so the runner works from any folder where l2rclip is installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.types.entrypoint import EntrypointType

from pipelines.retrain import retrain

DEFAULT_NAME = "nightly-retrain"
DEFAULT_CRON = "0 3 * * *"


def retrain_deployment(name: str = DEFAULT_NAME, cron: str = DEFAULT_CRON, repo: str = ".", margin: float = 0.0,
                       metric: str = "test/mae") -> RunnerDeployment:
    """The deployment of `retrain` for the project at `repo` (made absolute: runs start elsewhere)."""
    return retrain.to_deployment(
        name=name, cron=cron, entrypoint_type=EntrypointType.MODULE_PATH,
        parameters={"repo": str(Path(repo).expanduser().resolve()), "margin": margin, "metric": metric},
        description="Rebuild the DVC pipeline when data, params or code changed, and move the `champion` "
                    "alias only to a model that beats it on the same test images.")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: register the deployment and run it on its schedule until stopped."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=".", help="project folder (default: %(default)s)")
    parser.add_argument("--cron", default=DEFAULT_CRON, help="schedule, cron syntax (default: %(default)r)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="deployment name (default: %(default)s)")
    parser.add_argument("--margin", type=float, default=0.0, help="smallest improvement that promotes")
    parser.add_argument("--metric", default="test/mae", help="test metric compared (default: %(default)s)")
    args = parser.parse_args(argv)
    serve(retrain_deployment(args.name, args.cron, args.repo, args.margin, args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
