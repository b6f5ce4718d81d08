"""Experiments fanned out over machines, on one machine: the shared places and processes are real.

A bare git repository and a DVC remote folder are the team's shared places; a `prefect server
start`, an `mlflow server` and two `prefect worker start` processes (each in a clone of its own)
are the machines. The ablation flow submits two variants to the work pool; each worker checks
out the commit, pulls the prepared data, runs its experiment and pushes it back; the flow pulls
both and compares them, and the MLflow server holds both variants' runs.
"""

import os
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
from prefect.settings import PREFECT_HOME
from support.project import BIN, SMALL, copy_project, merge
from support.servers import GIT_IDENTITY, free_port, healthy, reporting_to, sh, stop, wait_for

from pipelines.ablation import VARIANT_TAG, ablation
from pipelines.deploy import main as deploy_main
from pipelines.fanout import CLONE_ENV, checkout, published_commit, require_server, worker_clone
from pipelines.folds import combine, fold_runs

POOL = "fanout-test"
GRID = {"loss.cop": [1.0, 0.0]}
NAMES = ["cop-1", "cop-0"]


# --- refusals before anything runs: plain git, no servers ---------------------------------------------


@pytest.fixture
def shared_git(tmp_path):
    """A bare remote, a lead clone with one pushed commit (a dvc.yaml) and a worker clone of it."""
    env = {**os.environ, **GIT_IDENTITY}
    remote, lead = tmp_path / "origin.git", tmp_path / "lead"
    sh(["git", "init", "-q", "--bare", "-b", "main", str(remote)], tmp_path, env)
    sh(["git", "clone", "-q", str(remote), str(lead)], tmp_path, env)
    (lead / "dvc.yaml").write_text("stages: {}\n")
    sh(["git", "add", "dvc.yaml"], lead, env)
    sh(["git", "commit", "-qm", "baseline"], lead, env)
    sh(["git", "push", "-q", "origin", "HEAD:main"], lead, env)
    sh(["git", "clone", "-q", str(remote), str(tmp_path / "worker")], tmp_path, env)
    return lead, tmp_path / "worker", env


def test_fan_out_refuses_uncommitted_or_unpushed_work_and_a_local_tracking_store(shared_git):
    lead, _, env = shared_git
    assert published_commit(lead, "origin") == sh(["git", "rev-parse", "HEAD"], lead, env).strip()
    (lead / "dvc.yaml").write_text("stages: {changed: {cmd: 'true'}}\n")
    with pytest.raises(RuntimeError, match=r"uncommitted changes to tracked files \(dvc.yaml\).*git push"):
        published_commit(lead, "origin")
    sh(["git", "commit", "-qam", "not pushed"], lead, env)
    with pytest.raises(RuntimeError, match=r"is not on the git remote 'origin' .*run `git push origin HEAD`"):
        published_commit(lead, "origin")
    for local in ("sqlite:////tmp/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns"):
        with pytest.raises(ValueError, match="an MLflow server every worker reaches"):
            require_server(local)
    require_server("http://mlflow-host:5000")


def test_a_worker_run_needs_its_clone_and_never_overwrites_local_changes(shared_git, monkeypatch):
    lead, worker, env = shared_git
    monkeypatch.delenv(CLONE_ENV, raising=False)
    with pytest.raises(RuntimeError, match=f"start the worker with {CLONE_ENV}="):
        worker_clone(None)
    monkeypatch.setenv(CLONE_ENV, str(worker))
    assert worker_clone(None) == worker.resolve()
    with pytest.raises(RuntimeError, match="commit 0123456789ab is not on the git remote 'origin'"):
        checkout(worker, "origin", "0123456789abcdef0123456789abcdef01234567")
    (lead / "dvc.yaml").write_text("stages: {next: {cmd: 'true'}}\n")
    sh(["git", "commit", "-qam", "next"], lead, env)
    sh(["git", "push", "-q", "origin", "HEAD:main"], lead, env)
    new = sh(["git", "rev-parse", "HEAD"], lead, env).strip()
    (worker / "dvc.yaml").write_text("stages: {mine: {cmd: 'true'}}\n")
    with pytest.raises(RuntimeError, match="has uncommitted changes to tracked files .*would lose them"):
        checkout(worker, "origin", new)
    sh(["git", "checkout", "--", "dvc.yaml"], worker, env)
    checkout(worker, "origin", new)
    assert sh(["git", "rev-parse", "HEAD"], worker, env).strip() == new


def test_folds_fan_out_as_one_experiment_each_and_summarise_like_the_report():
    settings = ["loss.cop=0", "folds=[2, 4]", "train.epochs=3"]
    assert fold_runs("fgnet", settings, default_folds=[0, 1]) == [  # pieces of one experiment: no registration
        ("fgnet-fold2", ["tracking.register=false", "loss.cop=0", "train.epochs=3", "folds=[2]"]),
        ("fgnet-fold4", ["tracking.register=false", "loss.cop=0", "train.epochs=3", "folds=[4]"]),
    ]
    assert [name for name, _ in fold_runs("x", [], default_folds=[0, 1, 2])] == ["x-fold0", "x-fold1", "x-fold2"]
    with pytest.raises(ValueError, match="expected a list of fold numbers .* found 'folds=3'"):
        fold_runs("x", ["folds=3"], default_folds=[0])

    def report(mae):
        return {"test/mae": {"mean": mae, "std": 0.0, "folds": [mae]}, "is_clip": False}

    combined = combine({"x-fold0": report(1.0), "x-fold1": report(1.5), "x-fold2": report(2.0)})
    assert combined == {"test/mae": {"mean": 1.5, "std": 0.5, "folds": [1.0, 1.5, 2.0]}, "is_clip": False}
    with pytest.raises(ValueError, match="x-fold0: expected a report of one fold, found 2 folds"):
        combine({"x-fold0": {"test/mae": {"mean": 1.0, "std": 0.0, "folds": [1.0, 1.0]}}})


# --- slow: the whole fan-out with real servers and workers ----------------------------------------------


def start(command: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """A background process leading its own session (so `stop` ends it and its children), logging to `log`."""
    with log.open("w") as out:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def shared_project(tmp_path: Path, env: dict) -> tuple[Path, Path]:
    """The lead's clone (prepared data pushed, baseline committed and pushed) and the DVC remote folder.

    The committed DVC remote points nowhere; every clone overrides it with `--local`, as a team would.
    """
    origin, store = tmp_path / "origin.git", tmp_path / "dvc-remote"
    sh(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path, env)
    lead = copy_project(tmp_path / "lead", merge(SMALL, {"model": {"fallback": {"epochs": 1}}}))
    sh(["git", "init", "-q", "-b", "main"], lead, env)
    sh([str(BIN / "dvc"), "init", "-q"], lead, env)
    sh([str(BIN / "dvc"), "remote", "add", "-d", "local", "../../l2rclip-dvc-remote"], lead, env)
    sh([str(BIN / "dvc"), "remote", "modify", "--local", "local", "url", str(store)], lead, env)
    sh([str(BIN / "dvc"), "repro", "prepare"], lead, env)  # demo data and splits: what the workers pull
    sh(["git", "add", "-A"], lead, env)
    sh(["git", "commit", "-qm", "baseline"], lead, env)
    sh(["git", "remote", "add", "origin", str(origin)], lead, env)
    sh(["git", "push", "-q", "origin", "main"], lead, env)
    sh([str(BIN / "dvc"), "push", "-q"], lead, env)
    return lead, store


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_ablation_fans_out_to_two_workers_through_shared_remotes(harness, tmp_path, monkeypatch):
    began = time.monotonic()
    prefect_url, mlflow_url = f"http://127.0.0.1:{free_port()}/api", f"http://127.0.0.1:{free_port()}"
    env = {
        key: value for key, value in os.environ.items() if key not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")
    }
    env.update(
        GIT_IDENTITY,
        PATH=f"{BIN}{os.pathsep}{env['PATH']}",
        HF_HUB_OFFLINE="1",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_WORKER_QUERY_SECONDS="2",
    )
    processes, logs = [], []
    try:
        logs.append(tmp_path / "prefect-server.log")
        processes.append(
            start(
                [
                    str(BIN / "prefect"),
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    prefect_url.rsplit(":", 1)[1].split("/")[0],
                    "--no-ui",
                ],
                tmp_path,
                env,
                logs[-1],
            )
        )
        logs.append(tmp_path / "mlflow-server.log")
        processes.append(
            start(
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    mlflow_url.rsplit(":", 1)[1],
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{tmp_path / 'mlflow.db'}",
                    "--serve-artifacts",
                    "--artifacts-destination",
                    str(tmp_path / "mlflow-artifacts"),
                ],
                tmp_path,
                {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                logs[-1],
            )
        )
        lead, store = shared_project(tmp_path, env)  # while the servers start
        clones = []
        for index in (1, 2):
            clone = tmp_path / f"worker-{index}"
            sh(["git", "clone", "-q", str(tmp_path / "origin.git"), str(clone)], tmp_path, env)
            sh([str(BIN / "dvc"), "remote", "modify", "--local", "local", "url", str(store)], clone, env)
            clones.append(clone)
        wait_for(lambda: healthy(prefect_url), 180, f"the Prefect server at {prefect_url}")
        wait_for(lambda: healthy(mlflow_url), 180, f"the MLflow server at {mlflow_url}")
        for key, value in {**GIT_IDENTITY, "MLFLOW_TRACKING_URI": mlflow_url, "HF_HUB_OFFLINE": "1"}.items():
            monkeypatch.setenv(key, value)
        with reporting_to(prefect_url, {PREFECT_HOME: tmp_path / "prefect"}):
            assert deploy_main(["--work-pool", POOL, "--repo", str(lead), "--timezone", "Europe/Berlin"]) == 0
            for index, clone in enumerate(clones, 1):
                logs.append(tmp_path / f"worker-{index}.log")
                worker_env = {**env, "PREFECT_API_URL": prefect_url, "L2RCLIP_CLONE": str(clone)}
                processes.append(
                    start(
                        [
                            str(BIN / "prefect"),
                            "worker",
                            "start",
                            "--pool",
                            POOL,
                            "--limit",
                            "1",
                            "--name",
                            f"worker-{index}",
                        ],
                        clone,
                        worker_env,
                        logs[-1],
                    )
                )
            with get_client(sync_client=True) as client:
                fanned, scheduled = (
                    client.read_deployment_by_name(name)
                    for name in (f"experiment/{POOL}", "retrain/nightly-retrain")
                )
                assert (fanned.work_pool_name, scheduled.work_pool_name) == (POOL, POOL)
                assert fanned.entrypoint == "pipelines.fanout.experiment" and not fanned.schedules
                assert [(s.schedule.cron, s.schedule.timezone) for s in scheduled.schedules] == [
                    ("0 3 * * *", "Europe/Berlin")
                ]
                assert client.read_work_pool(POOL).type == "process"
                online = WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
                wait_for(
                    lambda: (
                        True if len(client.read_workers_for_work_pool(POOL, worker_filter=online)) == 2 else None
                    ),
                    180,
                    "two workers online",
                )
            result = ablation(str(lead), grid=GRID, work_pool=POOL)

        assert [run["state"] for run in result["runs"]] == ["Completed", "Completed"]
        assert [v["name"] for v in result["variants"]] == NAMES
        assert all(len(v["test/mae"]["folds"]) == 1 for v in result["variants"])
        assert all(f"| {name} |" in result["table"] for name in NAMES)
        # each worker ran one experiment in its own clone, pushed it, and the lead pulled both
        ran = [set(sh([str(BIN / "dvc"), "exp", "list", "--name-only"], clone, env).split()) for clone in clones]
        assert sorted(map(sorted, ran)) == [["cop-0"], ["cop-1"]]
        pushed = sh(["git", "ls-remote", str(tmp_path / "origin.git"), "refs/exps/*"], lead, env).splitlines()
        assert len(pushed) == 2
        sh([str(BIN / "dvc"), "exp", "apply", "cop-0"], lead, env)  # its outputs came through the DVC remote
        assert (lead / "outputs/folds/1/train/best").is_dir()
        # both variants tracked to the MLflow server: a parent and a fold run each
        client = MlflowClient(mlflow_url)
        runs = client.search_runs([client.get_experiment_by_name("pipeline-test").experiment_id])
        assert sorted(run.data.tags.get(VARIANT_TAG) for run in runs) == sorted(NAMES * 2)
        assert result["tagged"] == 4
    finally:
        for process in reversed(processes):
            stop(process)
        for log in logs:  # shown by pytest only when the test fails
            print(f"--- {log.name}\n{log.read_text()[-4000:] if log.exists() else ''}")
        print(f"fan-out test wall time: {time.monotonic() - began:.0f} s")
