"""The model registry on a real MLflow SQLite store: versions, the champion alias, recorded decisions."""

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_predict import NUMBERS, mlflow_store, save_tiny_model

from l2rclip.config import DataConfig, Params, TrackingConfig, TrainConfig, to_dict
from l2rclip.data.demo import generate_demo
from l2rclip.models.checkpoint import ModelFileError
from l2rclip.predict import Predictor
from l2rclip.registry import champion, default_model_name, keep, promote, register
from l2rclip.stages.common import fingerprint
from l2rclip.stages.register import choose_fold, main, register_best
from l2rclip.tracking import PIPELINE_KEY_TAG, Tracker


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, str]:
    uri = mlflow_store(tmp_path_factory)
    run_id = Tracker(uri, experiment="registry-test").parent_run("key", "demo pipeline", {}, {})
    return uri, run_id


def test_register_keep_promote_and_load_the_champion(store, tmp_path):
    uri, run_id = store
    model_dir = save_tiny_model(tmp_path / "model")
    name = default_model_name("demo")
    assert name == "l2rclip-demo" and champion(name, uri) is None

    first = register(model_dir, name, run_id, {"l2rclip.fold": 0, "l2rclip.val/mae": 1.5, "l2rclip.x": None}, uri)
    second = register(model_dir, name, run_id, {"l2rclip.fold": 1}, uri)

    assert first == {"name": name, "version": 1, "model_uri": f"models:/{name}/1", "run_id": run_id,
                     "champion": True}
    assert second["version"] == 2 and second["champion"] is False
    client = MlflowClient(uri)
    v1 = client.get_model_version(name, "1")
    assert v1.run_id == run_id and v1.tags["l2rclip.decision"] == "promoted"
    assert {k: v1.tags[k] for k in ("l2rclip.fold", "l2rclip.val/mae", "l2rclip.is_clip", "l2rclip.backbone")} == {
        "l2rclip.fold": "0", "l2rclip.val/mae": "1.5", "l2rclip.is_clip": "false",
        "l2rclip.backbone": "L2RCLIP-Tiny"}
    assert "l2rclip.x" not in v1.tags and "l2rclip.decision" not in client.get_model_version(name, "2").tags

    keep(name, 2, "val/mae 1.2 is not below the champion's 1.1", uri)
    v2 = client.get_model_version(name, "2")
    assert int(champion(name, uri).version) == 1
    assert v2.tags["l2rclip.decision"] == "kept_champion"
    assert v2.tags["l2rclip.decision_reason"] == "val/mae 1.2 is not below the champion's 1.1"
    assert "version 1 stays champion" in v2.description

    promote(name, 2, "val/mae 0.9 < 1.1", uri)
    v2 = client.get_model_version(name, "2")
    assert int(champion(name, uri).version) == 2
    assert (v2.tags["l2rclip.decision"], v2.tags["l2rclip.decision_reason"]) == ("promoted", "val/mae 0.9 < 1.1")
    assert v2.description == "Promoted to champion (replacing version 1): val/mae 0.9 < 1.1"

    demo = tmp_path / "demo"
    generate_demo(demo, n_per_rank=1, image_size=64)
    paths = sorted(demo.rglob("*.png"))[:4]
    local = Predictor.load(model_dir).predict_paths(paths, progress=False)
    for uri_form in (f"models:/{name}@champion", f"models:/{name}/1"):
        registered = Predictor.load(uri_form, tracking_uri=uri).predict_paths(paths, progress=False)
        np.testing.assert_allclose(registered[NUMBERS].to_numpy(float), local[NUMBERS].to_numpy(float), atol=1e-6)


def test_unknown_model(store):
    uri, _ = store
    assert champion("l2rclip-nothing", uri) is None
    with pytest.raises(ModelFileError, match=r"models:/l2rclip-nothing@champion: cannot fetch the model"):
        Predictor.load("models:/l2rclip-nothing@champion", tracking_uri=uri)


def fake_pipeline_outputs(root: Path, uri: str | None, val_scores: dict[int, dict[str, float]]
                          ) -> tuple[Path, Path, str | None]:
    """Train and report outputs of a finished pipeline run, with real MLflow parent and child runs.

    With `uri` None, training could not reach MLflow: no run and no run handle (as the train stage).
    """
    tracker = Tracker(uri, experiment="stage-test") if uri else None
    parent = tracker.parent_run("stage-key", "csv pipeline", {}, {}) if tracker else None
    model = save_tiny_model(root / "model")
    for fold, best in val_scores.items():
        train = root / "folds" / str(fold) / "train"
        shutil.copytree(model, train / "best")
        (train / "summary.json").write_text(json.dumps({"best": best, "data_version": "d4t4"}))
        if tracker:
            tracker.write_handle(train, tracker.child_run(parent, f"fold {fold}", {}, {"l2rclip.fold": fold}),
                                 parent)
    report = root / "report" / "metrics.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"test/mae": {"mean": 1.25, "std": 0.1, "folds": [1.2, 1.3]},
                                  "backbone": "L2RCLIP-Tiny", "is_clip": False}))
    return root / "folds", report, parent


def test_register_stage_picks_the_best_validation_fold(store, tmp_path):
    uri, _ = store
    folds, report, parent = fake_pipeline_outputs(
        tmp_path, uri, {0: {"val/mae": 1.1, "val/accuracy": 0.6}, 1: {"val/mae": 0.8, "val/accuracy": 0.4}})
    params = Params(folds=(0, 1), data=DataConfig(source="csv"), train=TrainConfig(select_metric="accuracy"))
    assert choose_fold(params, folds)[:2] == (0, 0.6)  # higher accuracy is better
    params = dataclasses.replace(params, train=TrainConfig(select_metric="mae"))

    result = register_best(params, folds, report, tmp_path / "register")

    assert json.loads((tmp_path / "register" / "registered.json").read_text()) == result
    assert result["registered"] and result["fold"] == 1 and result["val/mae"] == 0.8
    assert (result["name"], result["version"], result["run_id"], result["champion"]) == ("l2rclip-csv", 1, parent,
                                                                                         True)
    tags = MlflowClient(uri).get_model_version("l2rclip-csv", "1").tags
    assert {k: tags[k] for k in ("l2rclip.fold", "l2rclip.val/mae", "l2rclip.data_version", "l2rclip.params_hash",
                                 "l2rclip.test/mae_mean", "l2rclip.is_clip")} == {
        "l2rclip.fold": "1", "l2rclip.val/mae": "0.8", "l2rclip.data_version": "d4t4",
        "l2rclip.params_hash": fingerprint(params), "l2rclip.test/mae_mean": "1.25", "l2rclip.is_clip": "false"}

    off = dataclasses.replace(params, tracking=TrackingConfig(enabled=False))
    skipped = register_best(off, folds, report, tmp_path / "off")
    assert not skipped["registered"] and skipped["reason"] == "tracking.enabled is false" and skipped["fold"] == 1


def closed_port_uri() -> str:
    """An http URI on which nothing listens (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def offline_pipeline(tmp_path, monkeypatch) -> dict:
    """Outputs of a pipeline whose training could not reach MLflow, and a params file for the stage."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # Tracker sets them for http stores; restored afterwards
    folds, report, _ = fake_pipeline_outputs(tmp_path, None, {0: {"val/mae": 1.1}, 1: {"val/mae": 0.9}})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(to_dict(Params(folds=(0, 1), data=DataConfig(source="offline"),
                                                    tracking=TrackingConfig(experiment="offline-test")))))
    args = ["--params", str(params), "--folds-dir", str(folds), "--report", str(report),
            "--out", str(tmp_path / "register")]
    return {"root": tmp_path, "folds": folds, "args": args, "out": tmp_path / "register" / "registered.json"}


def test_register_fails_with_the_reason_while_mlflow_is_down_then_registers(store, offline_pipeline, monkeypatch,
                                                                           capsys):
    uri, _ = store
    down = closed_port_uri()
    before = digest(offline_pipeline["folds"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)

    assert main(offline_pipeline["args"]) == 1
    err = capsys.readouterr().err
    assert f"the model was NOT registered: connect failed on {down}: the server does not answer" in err
    assert "Connection refused" in err and "`dvc repro` (or the retrain flow) runs it again" in err
    assert not offline_pipeline["out"].exists() and digest(offline_pipeline["folds"]) == before

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the server is back
    assert main(offline_pipeline["args"]) == 0
    result = json.loads(offline_pipeline["out"].read_text())
    assert result["registered"] and (result["name"], result["fold"]) == ("l2rclip-offline", 1)
    client = MlflowClient(uri)
    run = client.get_run(client.get_model_version("l2rclip-offline", str(result["version"])).run_id)
    assert run.data.tags[PIPELINE_KEY_TAG] and run.data.tags["l2rclip.registered_model"] == result["model_uri"]
    assert digest(offline_pipeline["folds"]) == before


def test_register_names_the_unreachable_store_of_a_tracked_training(offline_pipeline, capsys):
    down = closed_port_uri()
    handle = offline_pipeline["folds"] / "1" / "train" / "tracking.json"
    handle.write_text(json.dumps({"tracking_uri": down, "experiment_id": "1", "parent_run_id": "abc",
                                  "run_id": "def"}))
    assert main(offline_pipeline["args"]) == 1
    err = capsys.readouterr().err
    assert f"the training's MLflow run abc (in {handle}) cannot be reached: connect failed on {down}" in err
    assert "Connection refused" in err and not offline_pipeline["out"].exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dvc_keeps_register_pending_while_mlflow_is_down(store, offline_pipeline):
    """A register that failed is not recorded: `dvc status` shows it, and the next `dvc repro` registers."""
    uri, _ = store
    repo = offline_pipeline["root"]
    stage = {"cmd": " ".join(["python -m l2rclip.stages.register", *offline_pipeline["args"]]),
             "deps": ["folds", "report/metrics.json"], "outs": [{"register/registered.json": {"cache": False}}]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"register": stage}}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "DVC_NO_ANALYTICS": "1"}

    def dvc(*args: str, store_uri: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True,
                              env={**env, "MLFLOW_TRACKING_URI": store_uri}, timeout=300, check=False)

    versions = len(MlflowClient(uri).search_model_versions("name='l2rclip-offline'"))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    assert dvc("init", "-q", store_uri=uri).returncode == 0
    down = closed_port_uri()
    failed = dvc("repro", store_uri=down)
    assert failed.returncode != 0 and f"connect failed on {down}" in failed.stderr, failed.stderr
    print(failed.stderr)
    assert "register" in json.loads(dvc("status", "--json", store_uri=down).stdout)  # still to do

    done = dvc("repro", store_uri=uri)
    assert done.returncode == 0, done.stderr
    assert json.loads(offline_pipeline["out"].read_text())["registered"]
    assert json.loads(dvc("status", "--json", store_uri=uri).stdout or "{}") == {}
    assert "Running stage 'register'" not in dvc("repro", store_uri=uri).stdout  # up to date: no second version
    assert len(MlflowClient(uri).search_model_versions("name='l2rclip-offline'")) == versions + 1
