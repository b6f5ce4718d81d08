"""Experiments fanned out over machines: one DVC experiment per run of a work-pool deployment.

The local DVC queue (`dvc exp run --run-all --jobs N`) runs experiments side by side on one
machine. To use N machines, each variant becomes a flow run of the deployment
`experiment/<pool>` on the Prefect process work pool `<pool>`; every machine runs a worker
(`prefect worker start --pool <pool> --limit 1`) in a clone of the project of its own, and a
run, on whichever worker picks it up:

    1. checks out the experiment's baseline commit, fetched from the shared git remote;
    2. `dvc pull`s the baseline's outputs (data, prepared splits) from the shared DVC remote;
    3. `dvc exp run --temp -n <name> -S key=value ...` (a temporary copy: the clone stays clean);
    4. `dvc exp push <git remote> <name>`: the experiment's git ref to the git remote and its
       outputs to the DVC remote, where every other clone can `dvc exp pull` them;
while its stages track to the MLflow server the caller uses (`MLFLOW_TRACKING_URI`). Its callers'
settings start with `tracking.register=false` (`pipelines.ablation.NO_REGISTER`): experiments
run here are variants or pieces of one, and register no model.

The caller (`pipelines.ablation --work-pool <pool>`) checks that its commit is on the git remote,
submits one run per variant, waits for all of them, then `dvc exp pull`s the results and
compares them exactly as it does after a local queue. The deployment is registered by
`python -m pipelines.deploy --work-pool <pool>` (see `experiment_deployment`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
from prefect.deployments import run_deployment
from prefect.deployments.runner import RunnerDeployment
from prefect.types.entrypoint import EntrypointType

from pipelines.checkout_lock import checkout_lock
from pipelines.common import dvc_output, dvc_stream, project
from pipelines.flow_run import announce_api

FLOW_NAME = "experiment"
CLONE_ENV = "L2RCLIP_CLONE"  # the worker's clone, set where the worker is started


def git(repo: Path, *args: str) -> str:
    """Run git in `repo` and return its stdout; a failure raises with git's own message."""
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`git {' '.join(args)}` in {repo} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout.strip()


def _modified(repo: Path) -> list[str]:
    """Tracked files with uncommitted changes (untracked files are no part of a commit anyway)."""
    return [
        line.split(maxsplit=1)[-1]
        for line in git(repo, "status", "--porcelain", "--untracked-files=no").splitlines()
    ]


def published_commit(repo: Path, remote: str) -> str:
    """The commit of `repo`'s HEAD, checked to be on the git remote `remote` with nothing uncommitted.

    A run on another machine sees only what the remote has: uncommitted edits (which the local
    queue would carry) and unpushed commits would silently not be part of the experiment.
    """
    if changed := _modified(repo):
        raise RuntimeError(
            f"fan-out: {repo} has uncommitted changes to tracked files ({', '.join(changed[:5])}); "
            "runs on other machines check out a commit: commit them and `git push` first"
        )
    commit = git(repo, "rev-parse", "HEAD")
    git(repo, "fetch", "--quiet", remote)
    if not git(repo, "branch", "--remotes", "--contains", commit, "--list", f"{remote}/*"):
        raise RuntimeError(
            f"fan-out: commit {commit[:12]} is not on the git remote {remote!r} "
            f"({git(repo, 'remote', 'get-url', remote)}); run `git push {remote} HEAD` first"
        )
    return commit


def require_server(tracking: str) -> None:
    """Refuse a tracking URI that only this machine can write to (a SQLite file, a folder)."""
    if tracking.startswith(("sqlite:", "file:")) or "://" not in tracking:
        raise ValueError(
            f"fan-out: expected MLFLOW_TRACKING_URI to name an MLflow server every worker reaches "
            f"(e.g. http://mlflow-host:5000), found {tracking!r}"
        )


def worker_clone(clone: str | None) -> Path:
    """The clone this run works in: `clone`, else `$L2RCLIP_CLONE` of the worker's environment."""
    folder = clone or os.environ.get(CLONE_ENV)
    if not folder:
        raise RuntimeError(
            f"experiment: no clone to run in; start the worker with {CLONE_ENV}=/path/to/its/clone "
            "(a `git clone` of the shared remote, one per worker)"
        )
    return project(folder)


def checkout(repo: Path, remote: str, commit: str) -> None:
    """Check out `commit` (detached) after fetching `remote`; refuse to overwrite local changes."""
    if changed := _modified(repo):
        raise RuntimeError(
            f"experiment: the worker clone {repo} has uncommitted changes to tracked files "
            f"({', '.join(changed[:5])}); checking out {commit[:12]} would lose them: commit or "
            "discard them, or give the worker a clone of its own"
        )
    git(repo, "fetch", "--quiet", remote)
    try:
        git(repo, "cat-file", "-e", f"{commit}^{{commit}}")
    except RuntimeError:
        raise RuntimeError(
            f"experiment: commit {commit[:12]} is not on the git remote {remote!r} of {repo}; "
            "push it from the machine that submitted the run"
        ) from None
    git(repo, "-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", commit)


def experiment_names(repo: Path, remote: str | None = None) -> set[str]:
    """Names of the experiments on HEAD's commit, in `repo` or (given `remote`) on that git remote."""
    return set(dvc_output(repo, "exp", "list", *([remote] if remote else []), "--name-only").split())


@flow(name=FLOW_NAME)
def experiment(
    commit: str,
    name: str,
    settings: list[str],
    git_remote: str = "origin",
    tracking_uri: str | None = None,
    clone: str | None = None,
) -> dict[str, Any]:
    """Run one DVC experiment of `commit` in this worker's clone and push it back.

    Args:
        commit: the baseline commit (on `git_remote`).
        name: the experiment's name (`dvc exp run -n`); an earlier one of that name here is replaced.
        settings: `key=value` params overrides (`dvc exp run -S`).
        git_remote: the clone's name of the shared git remote.
        tracking_uri: the MLflow server the stages track to (default: the worker's own setting).
        clone: the clone to work in (default: `$L2RCLIP_CLONE`, set where the worker starts).

    Returns:
        `name`, `commit`, `host` and `clone`: where the experiment ran.

    Raises:
        RuntimeError: no clone, local changes in it, or the commit not on the remote (a run that
            finds another flow holding the clone waits for it); DvcError: a DVC command failed (the
            message ends with its output).
    """
    logger = get_run_logger()
    announce_api(logger)
    root = worker_clone(clone)
    env = {"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}
    with checkout_lock(root, log=logger):  # one DVC-running flow per clone, whatever `--limit` a worker has
        checkout(root, git_remote, commit)
        logger.info("experiment %s of %s in %s on %s", name, commit[:12], root, socket.gethostname())
        dvc_stream(root, "pull", "--allow-missing", echo=logger.info, env=env)  # missing: rebuilt by the run
        if name in experiment_names(root):
            dvc_output(root, "exp", "remove", name)
        arguments = [argument for setting in settings for argument in ("-S", setting)]
        dvc_stream(root, "exp", "run", "--temp", "-n", name, *arguments, echo=logger.info, env=env)
        dvc_stream(root, "exp", "push", git_remote, name, echo=logger.info, env=env)
    return {"name": name, "commit": commit, "host": socket.gethostname(), "clone": str(root)}


def experiment_deployment(pool: str) -> RunnerDeployment:
    """The deployment `experiment/<pool>` that `fan_out` submits to (register it on `pool`).

    The flow is referenced by module path, so a worker runs it from its installed l2rclip, and the
    stages from the experiment's own commit (`python -m` puts the stage's folder first).
    """
    return experiment.to_deployment(
        name=pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        description="One DVC experiment: check out the commit, dvc pull, dvc exp run, dvc exp push.",
    )


def wait_for_runs(ids: dict[str, UUID], poll_s: float) -> list[dict[str, Any]]:
    """Poll the flow runs `ids` (name -> id) until all have ended, logging every change of state.

    A run a user cancels counts as ended from `Cancelling` on: when its worker was stopped, the run
    died with it but stays `Running` (Prefect 3.9 marks nothing), and no worker confirms the cancel.

    Returns each run's name, whether it completed, its final state, message and id, in order.
    """
    logger = get_run_logger()
    seen: dict[str, str] = {}
    ended: dict[str, dict[str, Any]] = {}
    with get_client(sync_client=True) as client:
        while len(ended) < len(ids):
            for name, run_id in ids.items():
                state = client.read_flow_run(run_id).state if name not in ended else None
                if state is None or seen.get(name) == state.name:
                    continue
                seen[name] = state.name
                logger.info("%s: %s%s", name, state.name, f" ({state.message})" if state.message else "")
                if state.is_final() or state.is_cancelling():
                    ended[name] = {
                        "name": name,
                        "completed": state.is_completed(),
                        "state": state.name,
                        "message": state.message or "",
                        "flow_run_id": str(run_id),
                    }
            if len(ended) < len(ids):
                time.sleep(poll_s)
    return [ended[name] for name in ids]


def _online_workers(pool: str) -> int:
    with get_client(sync_client=True) as client:
        online = WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
        return len(client.read_workers_for_work_pool(pool, worker_filter=online))


def fan_out(
    root: Path,
    runs: Sequence[tuple[str, list[str]]],
    pool: str,
    tracking: str,
    git_remote: str = "origin",
    poll_s: float = 5.0,
) -> list[dict[str, Any]]:
    """Run each `(name, settings)` as a DVC experiment on the workers of `pool`; pull the results.

    Earlier experiments of the same names on this commit are replaced, here and on the remote.
    Returns each run's name, whether it completed, its final state and message, in order.

    Raises:
        ValueError: `tracking` is not a server every worker can reach.
    """
    require_server(tracking)
    commit = published_commit(root, git_remote)
    logger = get_run_logger()
    names = [name for name, _ in runs]
    if again := sorted(experiment_names(root, git_remote) & set(names)):
        logger.info("replacing earlier experiments %s on %s", ", ".join(again), git_remote)
        dvc_output(root, "exp", "remove", "--git-remote", git_remote, *again)
    if again := sorted(experiment_names(root) & set(names)):
        dvc_output(root, "exp", "remove", *again)
    if not _online_workers(pool):
        logger.warning(
            "no worker is online in the work pool %r: the runs wait until one starts "
            "(`prefect worker start --pool %s --limit 1` in a clone, with %s set)",
            pool,
            pool,
            CLONE_ENV,
        )
    ids = {}
    for name, settings in runs:  # all submitted at once: every idle worker takes one
        ids[name] = run_deployment(
            f"{FLOW_NAME}/{pool}",
            flow_run_name=name,
            tags=[f"dvc-exp:{name}"],
            timeout=0,
            parameters={
                "commit": commit,
                "name": name,
                "settings": settings,
                "git_remote": git_remote,
                "tracking_uri": tracking,
            },
        ).id
        logger.info("submitted %s to the work pool %r: %s", name, pool, " ".join(settings) or "no overrides")
    results = wait_for_runs(ids, poll_s)
    if done := [result["name"] for result in results if result["completed"]]:
        dvc_stream(root, "exp", "pull", git_remote, *done, echo=logger.info)
    return results
