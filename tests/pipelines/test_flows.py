"""Prefect flows for real: DVC in scratch repositories, a SQLite MLflow registry, a Prefect server.

Fast tests run the flows against Prefect's test harness (a temporary local server) with tiny
stand-in pipelines, and read their artifacts and tags back from it; one deploys `prefect.yaml` to a
work pool on a real `prefect server start`, whose worker runs the retrain deployment (about a
minute); the `slow` ones run the project's own pipeline as four DVC experiments and serve the
retrain flow from a real `prefect server start`.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
import zoneinfo
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.deployments import run_deployment
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL, temporary_settings
from support.project import ROOT, SMALL, copy_project, project_params
from support.servers import GIT_IDENTITY, free_port, healthy, reporting_to, sh, stop, wait_for

from l2rclip.config import ModelConfig, PromptConfig, load_params
from l2rclip.data.demo import generate_demo
from l2rclip.data.holdout import holdout_spec
from l2rclip.evaluation.ablation_report import comparison_table
from l2rclip.models.backbone import TINY_ARCH, load_backbone
from l2rclip.models.checkpoint import save_model
from l2rclip.models.factory import build_l2rclip
from l2rclip.ranks import RankSpace
from l2rclip.serving.predictor import Predictor
from l2rclip.serving.registry import HOLDOUT_SPEC_TAG, RANKS_TAG, champion, register
from l2rclip.tracking.provenance import data_version, fingerprint
from l2rclip.tracking.runs import Tracker
from pipelines.ablation import DEFAULT_GRID, VARIANT_TAG, ablation, expand, publish_comparison
from pipelines.checkout_lock import CheckoutBusyError, checkout_limit_name, checkout_lock, lease_file
from pipelines.common import DvcError, is_transient
from pipelines.deploy import DEFAULT_CRON, DEFAULT_NAME, deploy_to_pool, retrain_deployment
from pipelines.dvc_queue import live_workers
from pipelines.fanout import CLONE_ENV, experiment_deployment
from pipelines.flow_run import TEMPORARY_SERVER, api_target
from pipelines.pipeline import pipeline
from pipelines.retrain import ACCEPTED, NOT_COMPARED, RANK_CHANGE_TAG, decide, decision_markdown, retrain
from pipelines.settings import QUIET_DEFAULTS

BIN = Path(sys.executable).parent


@pytest.fixture
def env(monkeypatch, tmp_path) -> str:
    """Environment the flows pass on to DVC: git identity, this test's MLflow store; returns its URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for key, value in {**GIT_IDENTITY, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    return uri


def dvc_project(repo: Path, stages: dict) -> Path:
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    sh(["git", "init", "-q"], repo)
    sh([str(BIN / "dvc"), "init", "-q"], repo)
    return repo


def run_flow(flow_fn, *args, **kwargs):
    """Call a flow; its result and the id of its flow run (to read its artifacts and tags back)."""
    state = flow_fn(*args, return_state=True, **kwargs)
    return state.result(), state.state_details.flow_run_id


def artifacts_of(flow_run_id: UUID) -> dict:
    """The flow run's artifacts on the server, by key."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in found}


def tags_of(flow_run_id: UUID) -> list[str]:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).tags


# --- decisions, classification, the grid: pure functions ---------------------------------------------


@pytest.mark.parametrize(
    ("new", "current", "margin", "metric", "promote", "why"),
    [
        (0.90, 1.00, 0.0, "test/mae", True, "better by 0.1000"),
        (0.90, 1.00, 0.05, "test/mae", True, "> margin 0.05"),
        (0.98, 1.00, 0.05, "test/mae", False, "better by only 0.0200"),
        (1.00, 1.00, 0.0, "test/mae", False, "no better"),  # a tie keeps the champion
        (1.20, 1.00, 0.0, "test/mae", False, "worse by 0.2000"),
        (0.70, 0.60, 0.05, "test/accuracy", True, "better by 0.1000"),  # higher is better
        (0.55, 0.60, 0.0, "test/accuracy", False, "worse by 0.0500"),
        (math.nan, 1.00, 0.0, "test/mae", False, "not a number"),
    ],
)
def test_decide_promotes_only_when_better_by_more_than_the_margin(new, current, margin, metric, promote, why):
    decision = decide(new, current, margin, metric)
    assert decision.promote is promote and why in decision.reason and metric in decision.reason


def test_decide_rejects_a_negative_margin():
    with pytest.raises(ValueError, match="margin: expected a non-negative"):
        decide(1.0, 1.0, -0.1)


@pytest.mark.parametrize(
    ("returncode", "output", "transient"),
    [
        (255, "ERROR: failed to reproduce 'train@0': failed to run: python -m ..., exited with -9", True),
        (-9, "", True),
        (1, "ERROR: Unable to acquire lock. Most likely another DVC process is running", True),
        (255, "error: params.yaml: unknown key 'loss.cpo'\nERROR: failed to reproduce 'train@0'", False),
        (255, "Traceback (most recent call last):\nZeroDivisionError", False),
    ],
)
def test_only_failures_that_a_retry_can_fix_are_transient(returncode, output, transient):
    assert is_transient(returncode, output) is transient


def test_default_grid_is_rankformer_by_cop_with_the_full_model_first():
    variants = expand(DEFAULT_GRID)
    assert [v.name for v in variants] == [
        "rankformer-on_cop-1",
        "rankformer-on_cop-0",
        "rankformer-off_cop-1",
        "rankformer-off_cop-0",
    ]
    assert variants[3].overrides == {"model.rankformer.enabled": False, "loss.cop": 0.0}
    assert expand({"train.schedule": ["one_stage", "two_stage"]})[1].name == "schedule-two_stage"
    with pytest.raises(ValueError, match="at least one value"):
        expand({"loss.cop": []})


@flow(name="publish-comparison")
def publish_comparison_flow(results, metric):
    publish_comparison(results, metric, comparison_table(results, metric))


def test_ablation_publishes_its_comparison_as_flow_run_artifacts(harness):
    def summary(folds):
        return {"test/mae": {"mean": float(np.mean(folds)), "std": float(np.std(folds, ddof=1)), "folds": folds}}

    results = [
        {"name": "full", "overrides": {"loss.cop": 1.0}, "summary": summary([1.0, 1.2])},
        {"name": "broken", "overrides": {"loss.cop": 0.0}, "summary": None},
    ]
    _, run_id = run_flow(publish_comparison_flow, results, "test/mae")
    found = artifacts_of(run_id)
    assert found["ablation-comparison"].type == "markdown"
    assert found["ablation-comparison"].data == comparison_table(results, "test/mae")
    rows = json.loads(found["ablation-variants"].data)
    assert found["ablation-variants"].type == "table" and [row["variant"] for row in rows] == ["full", "broken"]
    assert rows[0]["loss.cop"] == 1.0 and rows[0]["folds"] == [1.0, 1.2] and rows[0]["status"] == "ok"
    assert rows[1]["status"] == "failed" and rows[1]["mean"] is None


# --- deployments: prefect.yaml and pipelines.deploy declare the same ones -----------------------------


def test_prefect_yaml_declares_the_work_pool_deployments_of_pipelines_deploy():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert config["build"] is None and config["push"] is None
    assert config["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $" + CLONE_ENV + " }}"}}
    ]  # read on the worker: each worker's own clone
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) == {DEFAULT_NAME, "l2rclip"}
    assert {d["work_pool"]["name"] for d in deployments.values()} == {"l2rclip"}
    for deployment in deployments.values():
        path, _, _ = deployment["entrypoint"].partition(":")
        assert (ROOT / path).is_file()
        loaded = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        assert set(deployment.get("parameters", {})) <= set(loaded.parameters.properties)
    assert load_flow_from_entrypoint(str(ROOT / deployments[DEFAULT_NAME]["entrypoint"])).name == "retrain"
    assert load_flow_from_entrypoint(str(ROOT / deployments["l2rclip"]["entrypoint"])).name == "experiment"
    nightly = deployments[DEFAULT_NAME]
    assert nightly["parameters"] == {"repo": ".", "margin": 0.0, "metric": "test/mae"}
    (schedule,) = nightly["schedules"]
    assert schedule["cron"] == DEFAULT_CRON and zoneinfo.ZoneInfo(schedule["timezone"])
    Cron(schedule["cron"], timezone=schedule["timezone"])  # a valid cron in a valid zone


def test_deploy_to_pool_creates_a_process_pool_and_registers_both_flows(harness, tmp_path):
    ids = deploy_to_pool(
        "fast-pool",
        retrain_deployment("fast-retrain", "30 2 * * 1-5", str(tmp_path), 0.05, timezone="Europe/Berlin"),
        experiment_deployment("fast-pool"),
    )
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("fast-pool").type == "process"
        scheduled, fanned = (client.read_deployment(deployment_id) for deployment_id in ids)
        assert (scheduled.name, fanned.name) == ("fast-retrain", "fast-pool")
        assert scheduled.work_pool_name == fanned.work_pool_name == "fast-pool"
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in scheduled.schedules] == [
            ("30 2 * * 1-5", "Europe/Berlin", True)
        ]
        assert scheduled.parameters == {"repo": str(tmp_path.resolve()), "margin": 0.05, "metric": "test/mae"}
        assert scheduled.entrypoint == "pipelines.retrain.retrain" and not fanned.schedules


# --- the quiet settings, the server a flow reports to, one DVC-running flow per checkout --------------


def test_flow_modules_set_the_quiet_defaults_before_prefect_reads_its_settings():
    env = {key: value for key, value in os.environ.items() if key not in {*QUIET_DEFAULTS, "PREFECT_API_URL"}}
    env["DO_NOT_TRACK"] = "mine"  # what the user exported wins
    probe = (
        "import os, pipelines.retrain\n"
        "from prefect.settings import get_current_settings\n"
        "s = get_current_settings()\n"
        "print(s.server.analytics_enabled, s.server.ephemeral.startup_timeout_seconds, "
        "*(os.environ[k] for k in ('MLFLOW_DISABLE_TELEMETRY', 'DVC_NO_ANALYTICS', 'DO_NOT_TRACK')))\n"
        "from pipelines.flow_run import api_target\nprint(api_target())"
    )
    out = sh([sys.executable, "-c", probe], ROOT, env).splitlines()
    assert out[0] == "False 180 true 1 mine"
    assert out[1] == TEMPORARY_SERVER and "will not appear in your UI" in out[1]


def test_a_flow_names_the_prefect_api_it_reports_to(harness):
    assert api_target() == PREFECT_API_URL.value() and api_target().startswith("http")


HOLDER = """\
import sys, time
from pathlib import Path
from pipelines.checkout_lock import checkout_lock
with checkout_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_flow_in_the_same_checkout_waits_then_fails_without_a_server(tmp_path):
    same, other = tmp_path / "same", tmp_path / "other"
    for repo in (same, other):
        (repo / ".dvc").mkdir(parents=True)
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(same)],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no server: the file lock alone
            began = time.monotonic()
            busy = f"another flow is running DVC .*PID {holder.pid}.*within 1 s"
            with pytest.raises(CheckoutBusyError, match=busy), checkout_lock(same, timeout_s=1, poll_s=0.2):
                pass
            assert 1 <= time.monotonic() - began < 10
            with checkout_lock(other, timeout_s=1), checkout_lock(other, timeout_s=0):  # re-entrant
                pass
            stop(holder)
            with checkout_lock(same, timeout_s=5):  # gone with its process, however it ended
                pass
    finally:
        stop(holder)


def test_a_second_flow_in_the_same_checkout_waits_for_the_servers_concurrency_limit(harness, tmp_path):
    same, other = tmp_path / "same", tmp_path / "other"
    for repo in (same, other):
        (repo / ".dvc").mkdir(parents=True)
    held, release = threading.Event(), threading.Event()

    def hold():
        with checkout_lock(same):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(60)
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(checkout_limit_name(same))
        assert (limit.limit, limit.active_slots) == (1, 1)
        busy = "holds the Prefect concurrency limit 'dvc-checkout-same-"
        with pytest.raises(CheckoutBusyError, match=busy), checkout_lock(same, timeout_s=2):
            pass
        with checkout_lock(other, timeout_s=5):  # another checkout has a limit of its own
            pass
    finally:
        release.set()
        holder.join(60)
    with checkout_lock(same, timeout_s=10):
        pass
    assert checkout_limit_name(same) != checkout_limit_name(other)


def test_a_killed_holders_server_slot_is_released_at_once_not_after_its_lease(harness, tmp_path):
    """Issue 21.8: the next flow need not wait out the lease of a flow that was killed (kill -9)."""
    same = tmp_path / "same"
    (same / ".dvc").mkdir(parents=True)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(same)],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert json.loads(lease_file(same).read_text())["pid"] == holder.pid
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        with get_client(sync_client=True) as client:  # the killed holder's slot is still taken on the server
            assert client.read_global_concurrency_limit_by_name(checkout_limit_name(same)).active_slots == 1
        began = time.monotonic()
        with checkout_lock(same, timeout_s=20, poll_s=0.2):
            waited = time.monotonic() - began
            assert json.loads(lease_file(same).read_text())["pid"] == os.getpid()
        assert waited < 10 and not lease_file(same).exists()
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(checkout_limit_name(same)).active_slots == 0
    finally:
        stop(holder)


def test_the_folds_flow_holds_the_checkout_tags_its_commit_and_publishes_its_summary(
    harness, tmp_path, monkeypatch
):
    """Issue 21.7: pipelines.folds takes the checkout lock, the commit tag and a result artifact, as the others."""
    import pipelines.folds as folds_module

    repo = dvc_project(tmp_path / "repo", {"noop": {"cmd": "true"}})
    (repo / "params.yaml").write_text("folds: [0, 1]\n")
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "init"], repo, env={**os.environ, **GIT_IDENTITY})
    held_elsewhere = []

    def fan_out(root, runs, pool, uri, remote):
        def other_flow():  # another thread is another flow: the lock is re-entrant only in its own thread
            try:
                with checkout_lock(root, timeout_s=0):
                    held_elsewhere.append(False)
            except CheckoutBusyError:
                held_elsewhere.append(True)

        thread = threading.Thread(target=other_flow)
        thread.start()
        thread.join()
        return [{"name": name, "completed": True, "state": "COMPLETED", "message": ""} for name, _ in runs]

    def report(mae):
        return {"summary": {"test/mae": {"mean": mae, "std": 0.0, "folds": [mae]}, "is_clip": False}}

    monkeypatch.setattr(folds_module, "fan_out", fan_out)
    monkeypatch.setattr(folds_module, "collect", lambda root: {"x-fold0": report(1.0), "x-fold1": report(2.0)})
    monkeypatch.setattr(folds_module, "tag_experiment_commits", lambda root, uri: 0)
    result, run_id = run_flow(folds_module.folds, "pool", "x", repo=str(repo))
    assert held_elsewhere == [True]
    assert result["summary"]["test/mae"]["folds"] == [1.0, 2.0]
    commit = sh(["git", "rev-parse", "HEAD"], repo).strip()
    assert {f"git:{commit[:12]}", "dvc-exp:x-fold0", "dvc-exp:x-fold1"} <= set(tags_of(run_id))
    artifact = artifacts_of(run_id)["folds-summary"]
    assert artifact.type == "markdown" and "| test/mae | 1.5000 +- 0.7071 | 1.0000 | 2.0000 |" in artifact.data


# --- the pipeline flow: retries ------------------------------------------------------------------------

FLAKY_STAGE = """\
import json, os, pathlib, signal, sys
attempts = pathlib.Path("attempts.txt")
attempts.write_text(str(int(attempts.read_text()) + 1 if attempts.exists() else 1))
if pathlib.Path("mode.txt").read_text() == "bad params":
    sys.exit(print("error: params.yaml: unknown key 'loss.cpo'", file=sys.stderr) or 2)
if attempts.read_text() == "1":
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
report = pathlib.Path("outputs/report/metrics.json")
report.parent.mkdir(parents=True, exist_ok=True)
report.write_text(json.dumps({"test/mae": {"mean": 1.1, "std": 0.1, "folds": [1.0, 1.2]}}))
report.with_name("report.md").write_text("# Report\\n\\n| metric | mean |\\n|---|---|\\n| test/mae | 1.100 |\\n")
"""


def test_pipeline_flow_retries_a_killed_stage_and_fails_at_once_on_bad_params(harness, env, tmp_path):
    repo = dvc_project(
        tmp_path / "repo",
        {
            "report": {
                "cmd": "python flaky.py",
                "deps": ["mode.txt"],
                "outs": [
                    {"outputs/report/metrics.json": {"cache": False}},
                    {"outputs/report/report.md": {"cache": False}},
                ],
            }
        },
    )
    (repo / "flaky.py").write_text(FLAKY_STAGE)
    (repo / "mode.txt").write_text("killed once")
    (repo / "outputs/prepare").mkdir(parents=True)  # prepared tables: the run is tagged with their version
    (repo / "outputs/prepare/images.csv").write_text("path,label\na.png,1\n")
    (repo / "outputs/prepare/splits.csv").write_text("path,fold,split\na.png,0,test\n")
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "stand-in"], repo)
    commit = sh(["git", "rev-parse", "HEAD"], repo).strip()

    summary, run_id = run_flow(pipeline, str(repo), retry_delay_s=0.1)
    assert summary["test/mae"]["folds"] == [1.0, 1.2] and (repo / "attempts.txt").read_text() == "2"
    report = artifacts_of(run_id)["pipeline-report"]
    assert report.type == "markdown" and "| test/mae | 1.100 |" in report.data
    assert "test/mae 1.100" in report.description
    tags = tags_of(run_id)
    assert f"git:{commit[:12]}" in tags and [tag for tag in tags if tag.startswith("data:")] == [
        f"data:{data_version(repo / 'outputs/prepare')}"
    ]  # as the MLflow runs carry it

    (repo / "attempts.txt").unlink()
    (repo / "mode.txt").write_text("bad params")
    with pytest.raises(DvcError, match="unknown key 'loss.cpo'") as failure:
        pipeline(str(repo), retry_delay_s=0.1)
    assert not failure.value.transient and (repo / "attempts.txt").read_text() == "1"  # not retried


# --- the retrain flow: a real register stage and registry ---------------------------------------------


def tiny_model(folder: Path, seed: int, top: int = 10) -> Path:
    """A random L2RCLIP-Tiny over counts 1..top; a large logit scale makes it confident (E[value] ~ argmax)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(TINY_ARCH, "none")
    config = ModelConfig(arch=TINY_ARCH, pretrained="none", prompt=PromptConfig(context_init="the number of"))
    space = RankSpace(list(range(1, top + 1)))
    model = build_l2rclip(backbone, space, config)
    model.logit_scale.fill_(math.log(1000.0))
    return save_model(model, folder, config, space, extra={"is_clip": False, "epoch": 1})


REGISTER_STAGE = {  # the project's register stage; the stages before it are files the test writes
    "cmd": "python -m l2rclip.stages.register --params params.yaml --out outputs/register",
    "deps": ["outputs/report/metrics.json", "outputs/metrics"],
    "params": [
        "folds",
        "data.source",
        "split.holdout_fraction",
        "split.holdout_salt",
        "train.select_metric",
        "tracking",
    ],
    "outs": [{"outputs/register/registered.json": {"cache": False}}],
}


@pytest.fixture
def retrain_repo(env, tmp_path):
    """A project whose last training produced `strong` (fold 0) while the champion is `weak`.

    Both models are random; which one is better is set by the promotion holdout's labels: they are
    `strong`'s own predictions, so `strong` is right on (almost) every image and `weak` is not.
    The fold's test split holds other images with other labels: the gate must not look at it.
    """
    repo = dvc_project(tmp_path / "repo", {"register": REGISTER_STAGE})
    params = project_params({"folds": [0], "train": {"device": "cpu"}, "tracking": {"experiment": "retrain-test"}})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    images = generate_demo(repo / "data/demo", n_per_rank=2, image_size=64)
    weak, strong = tiny_model(tmp_path / "weak", seed=1), tiny_model(tmp_path / "strong", seed=2)
    predicted = Predictor.load(strong, device="cpu").predict_paths(
        [repo / "data/demo" / path for path in images["path"]], progress=False
    )
    labels = predicted["pred_label"].astype(int)
    holdout = pd.DataFrame(
        {
            "path": images["path"],
            "group": images["group"],
            "label": labels,
            "rank": labels - 1,
            "value": labels.astype(float),
        }
    )
    (repo / "outputs/prepare").mkdir(parents=True)
    holdout.to_csv(repo / "outputs/prepare/holdout.csv", index=False)
    wrong = (labels % 10) + 1  # the test split, labelled against `strong`: scoring on it would keep `weak`
    holdout.assign(fold=0, split="test", label=wrong, rank=wrong - 1).to_csv(
        repo / "outputs/prepare/splits.csv", index=False
    )

    tracker = Tracker(env, experiment="retrain-test")
    parent = tracker.parent_run("key-v2", "demo pipeline", {}, {})
    train = repo / "outputs/folds/0/train"
    shutil.copytree(strong, train / "best")
    (train / "summary.json").write_text(json.dumps({"best": {"val/mae": 0.5}, "data_version": "v2"}))
    tracker.write_handle(train, tracker.child_run(parent, "fold 0", {}, {"l2rclip.fold": 0}), parent)
    (repo / "outputs/metrics").mkdir()
    (repo / "outputs/metrics/fold_0.json").write_text(json.dumps({"test/mae": 0.1}))
    (repo / "outputs/report").mkdir()
    (repo / "outputs/report/metrics.json").write_text(
        json.dumps({"test/mae": {"mean": 0.1, "std": 0.0, "folds": [0.1]}, "is_clip": False})
    )

    old_run = tracker.parent_run("key-v1", "demo pipeline", {}, {})
    hash_now = fingerprint(load_params(repo / "params.yaml"))
    spec = holdout_spec(params["split"]["holdout_fraction"], params["split"]["holdout_salt"])
    lineage = {"l2rclip.data_version": "v1", "l2rclip.params_hash": hash_now, HOLDOUT_SPEC_TAG: spec}
    first = register(weak, "l2rclip-demo", old_run, lineage, env)
    assert first["champion"] and first["version"] == 1
    return repo, weak


def test_retrain_promotes_a_better_model_then_is_up_to_date_then_keeps_the_champion(harness, retrain_repo, env):
    repo, weak = retrain_repo
    client = MlflowClient(env)

    promoted, run_id = run_flow(retrain, str(repo))  # the register stage never ran: stale; it registers version 2
    assert (promoted["stale"], promoted["version"], promoted["decision"], promoted["champion"]) == (
        ["register"],
        "2",
        "promoted",
        "2",
    )
    assert promoted["scores"]["new"] < promoted["scores"]["champion"] - 0.5
    assert promoted["gate"]["images"] == 20 and len(promoted["gate"]["version"]) == 16
    assert client.get_model_version("l2rclip-demo", "2").tags["l2rclip.gate_images"] == "20"
    assert promoted["changes"] == {"l2rclip.data_version": {"champion": "v1", "new": "v2"}}
    assert client.get_model_version("l2rclip-demo", "2").tags["l2rclip.decision"] == "promoted"
    decision = artifacts_of(run_id)["retrain-decision"]  # what the flow run's page shows
    assert decision.type == "markdown" and decision.description == "l2rclip-demo version 2: promoted"
    assert "version 2 promoted to champion" in decision.data and promoted["reason"] in decision.data
    assert f"| new | 2 | {promoted['scores']['new']:.4f} |" in decision.data
    assert f"| champion | 1 | {promoted['scores']['champion']:.4f} |" in decision.data
    assert "margin 0" in decision.data and "20 promotion-holdout images" in decision.data
    assert "l2rclip.data_version v1 -> v2" in decision.data and "now: version 2" in decision.data
    fold_run = json.loads((repo / "outputs/folds/0/train/tracking.json").read_text())["run_id"]
    assert client.get_model_version("l2rclip-demo", "2").run_id == fold_run  # logged where it was trained

    again, run_id = run_flow(retrain, str(repo))
    assert again["up_to_date"] and again["stale"] == [] and again["version"] == "2" and "scores" not in again
    decided = artifacts_of(run_id)["retrain-decision"].data
    assert "version 2 already decided by an earlier run (promoted)" in decided

    shutil.rmtree(repo / "outputs/folds/0/train/best")  # a new training run: the weak weights come back
    shutil.copytree(weak, repo / "outputs/folds/0/train/best")
    (repo / "outputs/metrics/fold_0.json").write_text(json.dumps({"test/mae": 0.9}))
    kept, run_id = run_flow(retrain, str(repo), margin=0.01)
    assert (kept["version"], kept["decision"], kept["champion"]) == ("3", "kept_champion", "2")
    assert "worse by" in kept["reason"] and str(champion("l2rclip-demo", env).version) == "2"
    assert client.get_model_version("l2rclip-demo", "3").tags["l2rclip.decision_reason"] == kept["reason"]
    assert "same holdout images" in kept["reason"]
    decision = artifacts_of(run_id)["retrain-decision"].data
    assert "version 3 not promoted: the champion stays" in decision and "`kept_champion`" in decision
    assert "worse by" in decision and "margin 0.01" in decision and "champion before: version 2" in decision


def test_retrain_refuses_to_compare_models_made_under_different_holdouts(harness, retrain_repo, env):
    repo, _ = retrain_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["split"]["holdout_salt"] = "another-salt"  # the champion (version 1) was made under the old one
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = retrain(str(repo))
    assert (result["decision"], result["champion"]) == ("kept_champion", "1") and "scores" not in result
    assert "another promotion holdout" in result["reason"] and "salt=another-salt" in result["reason"]


def test_retrain_does_not_compare_a_version_with_another_rank_set_unless_accepted(harness, retrain_repo, env):
    """Issue 21.9: ranks 1..10 -> 1..9 change the contract: refused, compared on shared ranks with the flag."""
    repo, _ = retrain_repo
    client = MlflowClient(env)
    client.delete_model_version_tag("l2rclip-demo", "1", RANKS_TAG)  # a champion registered before the tag existed
    shutil.rmtree(repo / "outputs/folds/0/train/best")
    tiny_model(repo / "outputs/folds/0/train/best", seed=2, top=9)  # the new training dropped rank 10
    holdout = pd.read_csv(repo / "outputs/prepare/holdout.csv")
    labels = holdout.index % 10 + 1  # every rank, 10 included (the random models may predict one rank only)
    holdout.assign(label=labels, rank=labels - 1, value=labels.astype(float)).to_csv(
        repo / "outputs/prepare/holdout.csv", index=False
    )
    refused = retrain(str(repo))
    assert (refused["version"], refused["decision"], refused["champion"]) == ("2", "kept_champion", "1")
    assert "scores" not in refused and not refused["rank_change"]["accepted"]
    assert "the rank set changed from 1 .. 10 (10 ranks) to 1 .. 9 (9 ranks) (dropped 10)" in refused["reason"]
    assert "--accept-rank-change" in refused["reason"]
    assert client.get_model_version("l2rclip-demo", "2").tags[RANK_CHANGE_TAG].endswith(NOT_COMPARED)

    accepted = retrain(str(repo), accept_rank_change=True)  # the refused version is decided again
    shared = (pd.read_csv(repo / "outputs/prepare/holdout.csv")["label"] != 10).sum()
    assert not accepted["decided_earlier"] and set(accepted["scores"]) == {"new", "champion"}
    assert accepted["rank_change"]["shared_ranks"] == list(range(1, 10))
    assert f"{ACCEPTED}: compared on the {shared} holdout images of the 9 ranks both share" in accepted["reason"]
    tags = client.get_model_version("l2rclip-demo", "2").tags
    assert tags[RANK_CHANGE_TAG].endswith(ACCEPTED) and tags["l2rclip.decision_reason"] == accepted["reason"]
    assert f"- rank set: {accepted['rank_change']['change']}; {ACCEPTED}" in decision_markdown(
        accepted, 0.0, "test/mae"
    )


def test_retrain_of_another_dataset_starts_its_own_lineage(harness, retrain_repo, env):
    repo, _ = retrain_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tracking"]["model_name"] = "faces-prod"  # another dataset's model: never gated on l2rclip-demo's
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = retrain(str(repo))
    assert (result["name"], result["version"], result["champion"]) == ("faces-prod", "1", "1")
    assert "scores" not in result and str(champion("l2rclip-demo", env).version) == "1"


# --- slow: the project's pipeline as DVC experiments; a real Prefect server ----------------------------


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ablation_runs_four_experiments_and_compares_them(harness, env, tmp_path):
    repo = copy_project(tmp_path / "repo", SMALL)
    sh(["git", "init", "-q"], repo)
    sh([str(BIN / "dvc"), "init", "-q"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "baseline"], repo)  # queued experiments start from a commit

    result = ablation(str(repo), jobs=2)

    assert not live_workers(repo)  # no DVC queue worker outlives the flow (pipelines.dvc_queue)
    names = [v.name for v in expand(DEFAULT_GRID)]
    listed = sh([str(BIN / "dvc"), "exp", "list", "--name-only"], repo, os.environ).split()
    assert sorted(listed) == sorted(names)
    assert [v["name"] for v in result["variants"]] == names
    assert all(len(v["test/mae"]["folds"]) == 1 for v in result["variants"])
    table = (repo / "outputs/ablation/ablation.md").read_text()
    assert table == result["table"] and all(f"| {name} |" in table for name in names)
    assert (repo / "outputs/ablation/ablation.png").stat().st_size > 10_000
    client = MlflowClient(env)
    runs = client.search_runs([client.get_experiment_by_name("pipeline-test").experiment_id])
    assert {run.data.tags.get(VARIANT_TAG) for run in runs} == set(names)
    assert result["tagged"] == len(runs) == 8  # a parent and a fold run per variant


@contextmanager
def prefect_server(home: Path, **settings: str):
    """A real `prefect server start` on a free local port with its own PREFECT_HOME, stopped after.

    Yields its API URL and the environment for processes that report to it (`settings` added).
    """
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true", **settings)
    server = subprocess.Popen(
        [
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            url.rsplit(":", 1)[1].split("/")[0],
            "--no-ui",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: healthy(url), 180, f"the Prefect server at {url}")
        with reporting_to(url):
            yield url, {**env, "PREFECT_API_URL": url}
    finally:
        stop(server)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_retrain_served_on_a_cron_schedule_by_a_real_prefect_server(tmp_path):
    runner = None
    with prefect_server(tmp_path / "prefect", PREFECT_RUNNER_POLL_FREQUENCY="2") as (_, env):
        try:
            not_a_project = tmp_path / "empty"
            not_a_project.mkdir()
            runner = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pipelines.deploy",
                    "--name",
                    "test-retrain",
                    "--cron",
                    "0 3 * * *",
                    "--repo",
                    str(not_a_project),
                    "--margin",
                    "0.05",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            with get_client(sync_client=True) as client:

                def deployment():
                    try:
                        return client.read_deployment_by_name("retrain/test-retrain")
                    except Exception:  # noqa: BLE001 - not registered yet
                        return None

                found = wait_for(deployment, 120, "the served deployment")
                assert [s.schedule.cron for s in found.schedules] == ["0 3 * * *"]
                assert found.parameters == {"repo": str(not_a_project), "margin": 0.05, "metric": "test/mae"}
                assert found.entrypoint == "pipelines.retrain.retrain"

                flow_run = run_deployment("retrain/test-retrain", timeout=0)  # started now, not at 3 am

                def final_state():
                    state = client.read_flow_run(flow_run.id).state
                    return state if state.is_final() else None

                done = wait_for(final_state, 180, "the runner to run the deployment")
                assert done.is_failed()  # the runner ran our flow, which refuses a folder without dvc.yaml
                assert "expected a DVC project" in done.message
        finally:
            if runner is not None:
                stop(runner)


@pytest.mark.slow  # end to end: the slow tier (make test-all)
@pytest.mark.timeout(900)
def test_prefect_yaml_deploys_to_a_work_pool_whose_worker_runs_the_nightly_retrain(tmp_path, retrain_repo, env):
    """`prefect deploy --all` of the repo's prefect.yaml; `prefect worker start --run-once` runs the retrain.

    The stand-in clone is `retrain_repo` with this checkout's `pipelines/` (a clone holds the code the
    entrypoints name); the run starts in it through the pull step (`$L2RCLIP_CLONE`, read on the worker).
    """
    repo, _ = retrain_repo
    shutil.copytree(ROOT / "pipelines", repo / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    with prefect_server(tmp_path / "prefect", PREFECT_WORKER_QUERY_SECONDS="2") as (_, server_env):
        cli = {
            **server_env,
            "PYTHONPATH": str(ROOT),
            "MLFLOW_TRACKING_URI": env,
            "HF_HUB_OFFLINE": "1",
            **GIT_IDENTITY,
        }
        sh([str(BIN / "prefect"), "work-pool", "create", "l2rclip", "--type", "process"], tmp_path, cli)
        sh(
            [str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(ROOT / "prefect.yaml")],
            repo,
            cli,
        )  # from a shell without $L2RCLIP_CLONE: the pull step keeps it for the worker
        with get_client(sync_client=True) as client:
            nightly = client.read_deployment_by_name(f"retrain/{DEFAULT_NAME}")
            assert nightly.work_pool_name == "l2rclip" and nightly.entrypoint == "pipelines/retrain.py:retrain"
            assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [(DEFAULT_CRON, "UTC")]
            assert nightly.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $" + CLONE_ENV + " }}"}}
            ]
            assert client.read_deployment_by_name("experiment/l2rclip").work_pool_name == "l2rclip"

            flow_run = run_deployment(f"retrain/{DEFAULT_NAME}", timeout=0)  # now, not at 03:00
            assert client.read_flow_run(flow_run.id).state.is_scheduled()  # waits in the pool: no worker yet
            sh(
                [str(BIN / "prefect"), "worker", "start", "--pool", "l2rclip", "--run-once", "--limit", "1"],
                tmp_path,
                {**cli, CLONE_ENV: str(repo)},
            )
            state = client.read_flow_run(flow_run.id).state
            assert state.is_completed(), f"{state.name}: {state.message}"
        decision = artifacts_of(flow_run.id)["retrain-decision"].data
    assert "version 2 promoted to champion" in decision
    assert str(champion("l2rclip-demo", env).version) == "2"  # the worker's run moved the alias
