"""Prefect flows for real: DVC in scratch repositories, a SQLite MLflow registry, a Prefect server.

Fast tests run the flows against Prefect's test harness (a temporary local server) with tiny
stand-in pipelines; the `slow` ones run the project's own pipeline as four DVC experiments and
serve the retrain flow from a real `prefect server start`.
"""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
from prefect.testing.utilities import prefect_test_harness
from test_pipeline import SMALL, copy_project, project_params

from l2rclip.config import ModelConfig, PromptConfig, load_params
from l2rclip.data.demo import generate_demo
from l2rclip.data.holdout import holdout_spec
from l2rclip.models.backbone import TINY_ARCH, load_backbone
from l2rclip.models.checkpoint import save_model
from l2rclip.models.factory import build_l2rclip
from l2rclip.predict import Predictor
from l2rclip.ranks import RankSpace
from l2rclip.registry import HOLDOUT_SPEC_TAG, champion, register
from l2rclip.stages.common import fingerprint
from l2rclip.tracking import Tracker
from pipelines.ablation import DEFAULT_GRID, VARIANT_TAG, ablation, expand
from pipelines.ablation_report import comparison_plot, comparison_table
from pipelines.common import DvcError, is_transient
from pipelines.pipeline import pipeline
from pipelines.retrain import decide, retrain

BIN = Path(sys.executable).parent
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t"}


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="session")
def harness(prefect_home):
    """Flows run against a temporary Prefect server (started once: it takes seconds)."""
    with (temporary_settings(updates={PREFECT_HOME: prefect_home}),
          prefect_test_harness(server_startup_timeout=180)):
        yield


@pytest.fixture
def env(monkeypatch, tmp_path) -> str:
    """Environment the flows pass on to DVC: git identity, this test's MLflow store; returns its URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for key, value in {**GIT_IDENTITY, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    return uri


def sh(command: list[str], cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def dvc_project(repo: Path, stages: dict) -> Path:
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    sh(["git", "init", "-q"], repo)
    sh([str(BIN / "dvc"), "init", "-q"], repo)
    return repo


# --- decisions, classification, the grid: pure functions ---------------------------------------------

@pytest.mark.parametrize(("new", "current", "margin", "metric", "promote", "why"), [
    (0.90, 1.00, 0.0, "test/mae", True, "better by 0.1000"),
    (0.90, 1.00, 0.05, "test/mae", True, "> margin 0.05"),
    (0.98, 1.00, 0.05, "test/mae", False, "better by only 0.0200"),
    (1.00, 1.00, 0.0, "test/mae", False, "no better"),  # a tie keeps the champion
    (1.20, 1.00, 0.0, "test/mae", False, "worse by 0.2000"),
    (0.70, 0.60, 0.05, "test/accuracy", True, "better by 0.1000"),  # higher is better
    (0.55, 0.60, 0.0, "test/accuracy", False, "worse by 0.0500"),
    (math.nan, 1.00, 0.0, "test/mae", False, "not a number"),
])
def test_decide_promotes_only_when_better_by_more_than_the_margin(new, current, margin, metric, promote, why):
    decision = decide(new, current, margin, metric)
    assert decision.promote is promote and why in decision.reason and metric in decision.reason


def test_decide_rejects_a_negative_margin():
    with pytest.raises(ValueError, match="margin: expected a non-negative"):
        decide(1.0, 1.0, -0.1)


@pytest.mark.parametrize(("returncode", "output", "transient"), [
    (255, "ERROR: failed to reproduce 'train@0': failed to run: python -m ..., exited with -9", True),
    (-9, "", True),
    (1, "ERROR: Unable to acquire lock. Most likely another DVC process is running", True),
    (255, "error: params.yaml: unknown key 'loss.cpo'\nERROR: failed to reproduce 'train@0'", False),
    (255, "Traceback (most recent call last):\nZeroDivisionError", False),
])
def test_only_failures_that_a_retry_can_fix_are_transient(returncode, output, transient):
    assert is_transient(returncode, output) is transient


def test_default_grid_is_rankformer_by_cop_with_the_full_model_first():
    variants = expand(DEFAULT_GRID)
    assert [v.name for v in variants] == ["rankformer-on_cop-1", "rankformer-on_cop-0", "rankformer-off_cop-1",
                                          "rankformer-off_cop-0"]
    assert variants[3].overrides == {"model.rankformer.enabled": False, "loss.cop": 0.0}
    assert expand({"train.schedule": ["one_stage", "two_stage"]})[1].name == "schedule-two_stage"
    with pytest.raises(ValueError, match="at least one value"):
        expand({"loss.cop": []})


def test_comparison_table_and_plot(tmp_path):
    def summary(folds):
        return {"test/mae": {"mean": float(np.mean(folds)), "std": float(np.std(folds, ddof=1)), "folds": folds},
                "is_clip": False}
    results = [{"name": "full", "overrides": {"loss.cop": 1.0}, "summary": summary([1.0, 1.2])},
               {"name": "no-cop", "overrides": {"loss.cop": 0.0}, "summary": summary([1.3, 1.5])},
               {"name": "broken", "overrides": {"loss.cop": 0.5}, "summary": None}]
    table = comparison_table(results, "test/mae")
    assert "| full | 1.0 | 1.1000 | 0.1414 | 1.000, 1.200 | +0.0000 |" in table
    assert "| no-cop | 0.0 | 1.4000 | 0.1414 | 1.300, 1.500 | +0.3000 |" in table
    assert "| broken | 0.5 | failed |" in table and "Best: **full**" in table and "NOT CLIP" in table
    assert comparison_plot(results, "test/mae", tmp_path / "a.png").stat().st_size > 10_000


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
"""


def test_pipeline_flow_retries_a_killed_stage_and_fails_at_once_on_bad_params(harness, env, tmp_path):
    repo = dvc_project(tmp_path / "repo", {"report": {
        "cmd": "python flaky.py", "deps": ["mode.txt"],
        "outs": [{"outputs/report/metrics.json": {"cache": False}}]}})
    (repo / "flaky.py").write_text(FLAKY_STAGE)
    (repo / "mode.txt").write_text("killed once")

    summary = pipeline(str(repo), retry_delay_s=0.1)
    assert summary["test/mae"]["folds"] == [1.0, 1.2] and (repo / "attempts.txt").read_text() == "2"

    (repo / "attempts.txt").unlink()
    (repo / "mode.txt").write_text("bad params")
    with pytest.raises(DvcError, match="unknown key 'loss.cpo'") as failure:
        pipeline(str(repo), retry_delay_s=0.1)
    assert not failure.value.transient and (repo / "attempts.txt").read_text() == "1"  # not retried


# --- the retrain flow: a real register stage and registry ---------------------------------------------

def tiny_model(folder: Path, seed: int) -> Path:
    """A random L2RCLIP-Tiny over counts 1..10; a large logit scale makes it confident (E[value] ~ argmax)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(TINY_ARCH, "none")
    config = ModelConfig(arch=TINY_ARCH, pretrained="none", prompt=PromptConfig(context_init="the number of"))
    space = RankSpace(list(range(1, 11)))
    model = build_l2rclip(backbone, space, config)
    model.logit_scale.fill_(math.log(1000.0))
    return save_model(model, folder, config, space, extra={"is_clip": False, "epoch": 1})


REGISTER_STAGE = {  # the project's register stage; the stages before it are files the test writes
    "cmd": "python -m l2rclip.stages.register --params params.yaml --out outputs/register",
    "deps": ["outputs/report/metrics.json", "outputs/metrics"],
    "params": ["folds", "data.source", "split.holdout_fraction", "split.holdout_salt", "train.select_metric",
               "tracking"],
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
        [repo / "data/demo" / path for path in images["path"]], progress=False)
    labels = predicted["pred_label"].astype(int)
    holdout = pd.DataFrame({"path": images["path"], "group": images["group"], "label": labels,
                            "rank": labels - 1, "value": labels.astype(float)})
    (repo / "outputs/prepare").mkdir(parents=True)
    holdout.to_csv(repo / "outputs/prepare/holdout.csv", index=False)
    wrong = (labels % 10) + 1  # the test split, labelled against `strong`: scoring on it would keep `weak`
    holdout.assign(fold=0, split="test", label=wrong, rank=wrong - 1).to_csv(
        repo / "outputs/prepare/splits.csv", index=False)

    tracker = Tracker(env, experiment="retrain-test")
    parent = tracker.parent_run("key-v2", "demo pipeline", {}, {})
    train = repo / "outputs/folds/0/train"
    shutil.copytree(strong, train / "best")
    (train / "summary.json").write_text(json.dumps({"best": {"val/mae": 0.5}, "data_version": "v2"}))
    tracker.write_handle(train, tracker.child_run(parent, "fold 0", {}, {"l2rclip.fold": 0}), parent)
    (repo / "outputs/metrics").mkdir()
    (repo / "outputs/metrics/fold_0.json").write_text(json.dumps({"test/mae": 0.1}))
    (repo / "outputs/report").mkdir()
    (repo / "outputs/report/metrics.json").write_text(json.dumps(
        {"test/mae": {"mean": 0.1, "std": 0.0, "folds": [0.1]}, "is_clip": False}))

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

    promoted = retrain(str(repo))  # the register stage never ran: stale; it registers version 2
    assert (promoted["stale"], promoted["version"], promoted["decision"], promoted["champion"]) == (
        ["register"], "2", "promoted", "2")
    assert promoted["scores"]["new"] < promoted["scores"]["champion"] - 0.5
    assert promoted["gate"]["images"] == 20 and len(promoted["gate"]["version"]) == 16
    assert client.get_model_version("l2rclip-demo", "2").tags["l2rclip.gate_images"] == "20"
    assert promoted["changes"] == {"l2rclip.data_version": {"champion": "v1", "new": "v2"}}
    assert client.get_model_version("l2rclip-demo", "2").tags["l2rclip.decision"] == "promoted"

    again = retrain(str(repo))
    assert again["up_to_date"] and again["stale"] == [] and again["version"] == "2" and "scores" not in again

    shutil.rmtree(repo / "outputs/folds/0/train/best")  # a new training run: the weak weights come back
    shutil.copytree(weak, repo / "outputs/folds/0/train/best")
    (repo / "outputs/metrics/fold_0.json").write_text(json.dumps({"test/mae": 0.9}))
    kept = retrain(str(repo), margin=0.01)
    assert (kept["version"], kept["decision"], kept["champion"]) == ("3", "kept_champion", "2")
    assert "worse by" in kept["reason"] and str(champion("l2rclip-demo", env).version) == "2"
    assert client.get_model_version("l2rclip-demo", "3").tags["l2rclip.decision_reason"] == kept["reason"]
    assert "same holdout images" in kept["reason"]


def test_retrain_refuses_to_compare_models_made_under_different_holdouts(harness, retrain_repo, env):
    repo, _ = retrain_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["split"]["holdout_salt"] = "another-salt"  # the champion (version 1) was made under the old one
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = retrain(str(repo))
    assert (result["decision"], result["champion"]) == ("kept_champion", "1") and "scores" not in result
    assert "another promotion holdout" in result["reason"] and "salt=another-salt" in result["reason"]


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (value := check()) is not None:
            return value
        time.sleep(1)
    raise AssertionError(f"gave up after {seconds:.0f} s waiting for {what}")


def healthy(url: str) -> bool | None:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2):
            return True
    except OSError:
        return None


def stop(process: subprocess.Popen) -> None:
    """Terminate a process started here and its children (it leads its own session), then wait."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_retrain_served_on_a_cron_schedule_by_a_real_prefect_server(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/api"
    server_env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    server_env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      DO_NOT_TRACK="true", PREFECT_RUNNER_POLL_FREQUENCY="2")
    port = url.rsplit(":", 1)[1].split("/")[0]
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port,
                               "--no-ui"], env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    runner = None
    try:
        wait_for(lambda: healthy(url), 180, f"the Prefect server at {url}")
        not_a_project = tmp_path / "empty"
        not_a_project.mkdir()
        runner = subprocess.Popen(
            [sys.executable, "-m", "pipelines.deploy", "--name", "test-retrain", "--cron", "0 3 * * *",
             "--repo", str(not_a_project), "--margin", "0.05"], env={**server_env, "PREFECT_API_URL": url},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment

        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
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
        stop(server)
