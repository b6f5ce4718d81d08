"""Deploy the flows: `retrain` on a cron schedule, and `experiment` for fanned-out ablations.

Both ways need a real Prefect server (the temporary one a plain flow call starts lives only as
long as that call, and keeps no schedules):

    prefect server start                                    # terminal 1 (or a shared server)
    export PREFECT_API_URL=http://127.0.0.1:4200/api        # terminal 2

Served (one process, one machine): this process registers `retrain` with its schedule and runs
each scheduled or manually started flow run in a subprocess until stopped with Ctrl+C, which also
pauses the deployment (its schedule stops creating runs until it is served again):

    python -m pipelines.deploy --repo . --cron "0 3 * * *" --timezone Europe/Berlin --margin 0.05

Work pool (Prefect 3's way; runs outlive any one terminal): with `--work-pool NAME` it creates the
process work pool NAME if missing, registers `retrain/<name>` (the schedule) and
`experiment/NAME` (one DVC experiment per run, `pipelines.fanout`) on it, and exits. Workers,
started on any machine (`prefect worker start --pool NAME --limit 1`), run what the pool holds:

    python -m pipelines.deploy --work-pool l2rclip --repo /srv/l2rclip --cron "0 3 * * *"

`prefect.yaml` at the repository root declares the same two deployments on the pool `l2rclip`
for `prefect deploy --all` (each run starts in the worker's `$L2RCLIP_CLONE`, so `repo` is `.`).

Either way `prefect deployment run retrain/<name>` starts a run now. Flows are referenced by
module path (`pipelines.retrain.retrain`), so a runner or worker works from any folder where
l2rclip is installed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from uuid import UUID

from prefect import deploy, serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType
from prefect.workers.process import ProcessWorker

from pipelines.fanout import CLONE_ENV, experiment_deployment
from pipelines.retrain import retrain

DEFAULT_NAME = "nightly-retrain"
DEFAULT_CRON = "0 3 * * *"
log = logging.getLogger(__name__)


def retrain_deployment(
    name: str = DEFAULT_NAME,
    cron: str = DEFAULT_CRON,
    repo: str = ".",
    margin: float = 0.0,
    metric: str = "test/mae",
    timezone: str | None = None,
) -> RunnerDeployment:
    """The deployment of `retrain` for the project at `repo` (made absolute: runs start elsewhere).

    `timezone` (an IANA name such as `Europe/Berlin`) is the cron's clock; None means UTC.
    """
    return retrain.to_deployment(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        entrypoint_type=EntrypointType.MODULE_PATH,
        parameters={"repo": str(Path(repo).expanduser().resolve()), "margin": margin, "metric": metric},
        description="Rebuild the DVC pipeline when data, params or code changed, and move the `champion` "
        "alias only to a model that beats it on the same test images.",
    )


def ensure_process_pool(pool: str) -> None:
    """Create the process work pool `pool` when it does not exist; refuse one of another type."""
    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(
                WorkPoolCreate(
                    name=pool,
                    type=ProcessWorker.type,
                    base_job_template=template,
                    description="l2rclip: scheduled retraining and fanned-out DVC experiments",
                )
            )
            log.info("created the process work pool %r", pool)
            return
    if found.type != ProcessWorker.type:
        raise ValueError(
            f"work pool {pool!r}: expected a {ProcessWorker.type!r} pool, found type {found.type!r}; "
            "choose another name or delete that pool"
        )


def deploy_to_pool(pool: str, *deployments: RunnerDeployment) -> list[UUID]:
    """Register `deployments` on the process work pool `pool` (created if missing); their ids."""
    ensure_process_pool(pool)
    return deploy(
        *deployments,
        work_pool_name=pool,
        build=False,
        push=False,
        print_next_steps_message=False,
        ignore_warnings=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: serve `retrain` until stopped, or register both flows on a work pool and exit."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.deploy", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--repo", default=".", help="project folder, as the runner or workers see it (default: %(default)s)"
    )
    parser.add_argument("--cron", default=DEFAULT_CRON, help="schedule, cron syntax (default: %(default)r)")
    parser.add_argument("--timezone", help="the cron's time zone, e.g. Europe/Berlin (default: UTC)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="deployment name (default: %(default)s)")
    parser.add_argument("--margin", type=float, default=0.0, help="smallest improvement that promotes")
    parser.add_argument("--metric", default="test/mae", help="test metric compared (default: %(default)s)")
    parser.add_argument(
        "--work-pool",
        help="register on this process work pool (created if missing) and exit, "
        "instead of serving from this process",
    )
    args = parser.parse_args(argv)
    scheduled = retrain_deployment(args.name, args.cron, args.repo, args.margin, args.metric, args.timezone)
    if not args.work_pool:
        serve(scheduled)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    deploy_to_pool(args.work_pool, scheduled, experiment_deployment(args.work_pool))
    log.info(
        "registered retrain/%s and experiment/%s on the work pool %r; start a worker per machine, in a "
        "clone of the project: %s=$PWD prefect worker start --pool %s --limit 1",
        args.name,
        args.work_pool,
        args.work_pool,
        CLONE_ENV,
        args.work_pool,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
