"""MLflow runs follow MLflow's conventions: effective params, names, standard tags, true durations, inputs.

The train, calibrate and evaluate stage functions run on a tiny demo fold against a real SQLite
store, as `dvc exp run` would start them (its environment variables set), in a git checkout.
"""

import json
import logging
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from support.project import SMALL, merge

from l2rclip.config import Params, from_dict, to_flat_dict
from l2rclip.data.demo import generate_demo
from l2rclip.methods import resolve_method
from l2rclip.stages.calibrate import calibrate_fold
from l2rclip.stages.evaluate import evaluate_fold
from l2rclip.stages.prepare import prepare
from l2rclip.stages.register import training_run
from l2rclip.stages.train import train_fold
from l2rclip.tracking.provenance import data_version, git_state, pipeline_key
from l2rclip.tracking.runs import EXPERIMENT_TAGS, PARENT_TAG, PIPELINE_KEY_TAG, Tracker, tag_experiment_commits


def git(repo, *args):
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A committed git checkout as cwd, MLflow on SQLite, and the variables `dvc exp run` sets."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "code.py").write_text("x = 1\n")
    (repo / "params.yaml").write_text("seed: 0\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline")
    monkeypatch.chdir(repo)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    baseline = git(repo, "rev-parse", "HEAD")
    monkeypatch.setenv("DVC_EXP_NAME", "cop-half")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", baseline)
    return repo, uri, baseline


def test_git_state_ignores_what_dvc_changes_and_names_what_else_differs(checkout, monkeypatch):
    repo, _, _ = checkout
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")  # outside `dvc exp run`: the commit is HEAD
    (repo / "outputs").mkdir()
    (repo / "outputs" / "metrics.json").write_text("{}\n")
    (repo / "dvc.lock").write_text(
        yaml.safe_dump(
            {
                "schema": "2.0",
                "stages": {
                    "report": {
                        "params": {"params.yaml": {"seed": 0}},
                        "outs": [{"path": "outputs/metrics.json", "md5": "x"}],
                    }
                },
            }
        )
    )
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "outputs")
    head = git(repo, "rev-parse", "HEAD")
    # what `dvc exp run -S seed=1` and its stages change: params, lock, a git-tracked output, a .gitignore
    (repo / "params.yaml").write_text("seed: 1\n")
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (repo / "outputs" / "metrics.json").write_text('{"mae": 1}\n')
    (repo / ".gitignore").write_text("/outputs/folds\n")
    assert git_state(repo) == {"mlflow.source.git.commit": head, "git_dirty": "false", "l2rclip.git_changed": None}
    (repo / "code.py").write_text("x = 2\n")
    assert git_state(repo) == {
        "mlflow.source.git.commit": head,
        "git_dirty": "true",
        "l2rclip.git_changed": "code.py",
    }


@pytest.fixture
def fold(checkout, tmp_path):
    """Params asking for CLIP (offline: the random fallback trains instead) and a prepared demo fold."""
    params = from_dict(
        Params,
        merge(
            SMALL,
            {
                "data": {"root": str(tmp_path / "demo"), "demo": {"n_per_rank": 8, "image_size": 48}},
                "model": {
                    "arch": "ViT-B-16",
                    "pretrained": "openai",
                    # the random fallback: its from-scratch epochs and rate replace the train settings
                    "fallback": {"arch": "L2RCLIP-Tiny", "pretrained": "none", "epochs": 2, "lr_image": 0.002},
                },
                "train": {"epochs": 7, "lr_image": 1e-5, "device": "cpu"},
                "tracking": {"experiment": "conventions", "system_metrics_interval": 0.1},
            },
        ),
    )
    generate_demo(tmp_path / "demo", n_per_rank=8, image_size=48)
    prepare(params, tmp_path / "prepared")
    return params, tmp_path / "prepared"


def test_train_calibrate_evaluate_follow_mlflow_conventions(fold, checkout, tmp_path):
    params, prepared = fold
    _, uri, baseline = checkout
    out = tmp_path / "folds/0"
    summary = train_fold(params, 0, prepared, out / "train")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("conventions")
    assert {k: experiment.tags.get(k) for k in EXPERIMENT_TAGS} == EXPERIMENT_TAGS
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if PARENT_TAG not in r.data.tags]
    [child] = [r for r in runs if PARENT_TAG in r.data.tags]
    trained = child.info

    # the params are what ran: the fallback backbone, its epochs and rate; the request is an artifact
    for run in (parent, child):
        p = run.data.params
        assert (p["model.arch"], p["model.pretrained"], p["train.epochs"], p["train.lr_image"]) == (
            "L2RCLIP-Tiny",
            "none",
            "2",
            "0.002",
        )
        assert not [key for key in p if key.endswith("_used")]
        assert run.data.tags["l2rclip.requested_differs"] == "true"
        assert {"model.arch", "model.pretrained", "train.epochs", "train.lr_image"} <= set(
            run.data.tags["l2rclip.requested_differs_keys"].split(", ")
        )
        local = client.download_artifacts(run.info.run_id, "params/requested.yaml", str(tmp_path / "dl"))
        requested = yaml.safe_load(Path(local).read_text())
        assert requested["model"]["arch"] == "ViT-B-16" and requested["train"]["epochs"] == 7

    # named after the DVC experiment, with MLflow's standard tags and the experiment's baseline
    assert (parent.info.run_name, child.info.run_name) == ("cop-half", "cop-half fold 0")
    assert child.data.tags["mlflow.runName"] == "cop-half fold 0"
    for run in (parent, child):
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == baseline and tags["git_dirty"] == "false"
        assert tags["mlflow.source.name"] == "l2rclip.stages.train" and tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.user"]
        assert (tags["l2rclip.dvc_exp"], tags["l2rclip.dvc_baseline"]) == ("cop-half", baseline)
        assert "git_commit" not in tags
    # the key every stage recomputes still finds this parent (register's fallback path uses it)
    version = data_version(prepared)
    assert parent.data.tags[PIPELINE_KEY_TAG] == pipeline_key(to_flat_dict(resolve_method(params)), version)
    assert training_run(params, tmp_path / "no-handle", version)[2] == parent.info.run_id

    # the fold run ended with training; best epoch and system metrics beside the per-epoch values
    assert trained.status == "FINISHED" and trained.end_time is not None
    metrics = child.data.metrics
    assert metrics["best/epoch"] == summary["best_epoch"]
    assert metrics["best/val/mae"] == pytest.approx(summary["best"]["val/mae"])
    assert len(client.get_metric_history(trained.run_id, "val/mae")) == 2
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics

    calibration = calibrate_fold(params, 0, prepared, out / "train/best", out / "calibrate/calibration.json")
    assert calibration["calibrated"]
    evaluate_fold(
        params,
        0,
        prepared,
        out / "train/best",
        out / "evaluate",
        tmp_path / "metrics.json",
        out / "calibrate/calibration.json",
    )
    after = client.get_run(trained.run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", trained.end_time)  # not reopened
    assert min(m.timestamp for m in client.get_metric_history(trained.run_id, "test/mae")) >= trained.end_time
    assert "calib/ece" in after.data.metrics

    # the splits as dataset inputs, digest = the DVC data version, context = the split's role
    inputs = {i.dataset.name: i for i in after.inputs.dataset_inputs}
    assert set(inputs) == {f"demo-fold0-{s}" for s in ("train", "val", "calib", "test")}
    assert {i.dataset.digest for i in inputs.values()} == {version}
    contexts = {name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for name, i in inputs.items()}
    assert contexts == {
        "demo-fold0-train": "train",
        "demo-fold0-val": "validation",
        "demo-fold0-calib": "calibration",
        "demo-fold0-test": "test",
    }
    train = inputs["demo-fold0-train"].dataset
    assert train.source_type == "dvc" and json.loads(train.source) == {
        "path": str(prepared / "splits.csv"),
        "data_version": version,
    }
    assert json.loads(train.profile)["num_rows"] == summary["train_images"]


def test_a_resumed_training_continues_its_run(fold, checkout, tmp_path):
    params, prepared = fold
    _, uri, _ = checkout
    out = tmp_path / "folds/0/train"
    train_fold(params, 0, prepared, out)
    first = Tracker.from_handle(out)[1]["run_id"]
    train_fold(params, 0, prepared, out)  # same computation: resumes from last/ (here: already complete)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("conventions").experiment_id])
    assert [r.info.run_id for r in runs if PARENT_TAG in r.data.tags] == [first]
    assert Tracker.from_handle(out)[1]["run_id"] == first


def test_existing_experiments_get_the_training_kind_but_keep_their_note(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    plain = client.create_experiment("plain")
    noted = client.create_experiment("noted", tags={"mlflow.note.content": "mine"})
    for name in ("plain", "noted"):
        tracker = Tracker(uri, experiment=name)
        assert tracker.parent_run("k", "p", {}, {})
    assert client.get_experiment(plain).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(plain).tags["mlflow.note.content"] == EXPERIMENT_TAGS["mlflow.note.content"]
    tags = client.get_experiment(noted).tags
    assert tags["mlflow.note.content"] == "mine" and tags["mlflow.experimentKind"] == "custom_model_development"


def test_tagging_experiment_commits_outside_a_dvc_repository_warns_and_tags_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="l2rclip"):
        assert tag_experiment_commits(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}") == 0
    assert "dvc exp show --json" in caplog.text and str(tmp_path) in caplog.text
