"""The model registry on a real MLflow SQLite store: versions, the champion alias, recorded decisions,
model <-> version <-> run links, the registration switch, one registered model and one report lineage
per dataset."""

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
from support.models import NUMBERS, mlflow_store, save_tiny_model
from support.project import ROOT

from l2rclip.config import (
    ConfigError,
    DataConfig,
    Params,
    TrackingConfig,
    TrainConfig,
    from_dict,
    model_name,
    to_dict,
)
from l2rclip.data.demo import generate_demo
from l2rclip.data.holdout import holdout_spec
from l2rclip.models.checkpoint import ModelFileError
from l2rclip.serving.predictor import Predictor
from l2rclip.serving.registry import champion, keep, promote, register
from l2rclip.stages.register import choose_fold, main, register_best
from l2rclip.stages.report import report as report_stage
from l2rclip.tracking.provenance import fingerprint
from l2rclip.tracking.runs import PARENT_TAG, PIPELINE_KEY_TAG, Tracker
from pipelines.ablation import NO_REGISTER, variant_settings


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, str, str]:
    """A store with a pipeline run and a finished fold run under it: (URI, fold run, parent run)."""
    uri = mlflow_store(tmp_path_factory)
    tracker = Tracker(uri, experiment="registry-test")
    parent = tracker.parent_run("key", "demo pipeline", {}, {})
    fold_run = tracker.child_run(parent, "fold 0", {}, {"l2rclip.fold": 0})
    tracker.end_run(fold_run)
    return uri, fold_run, parent


def test_register_keep_promote_and_load_the_champion(store, tmp_path):
    uri, run_id, parent = store
    model_dir = save_tiny_model(tmp_path / "model")
    name = "l2rclip-demo"
    assert champion(name, uri) is None

    first = register(model_dir, name, run_id, {"l2rclip.fold": 0, "l2rclip.val/mae": 1.5, "l2rclip.x": None}, uri)
    second = register(model_dir, name, run_id, {"l2rclip.fold": 1}, uri)

    assert first == {
        "name": name,
        "version": 1,
        "model_uri": f"models:/{name}/1",
        "run_id": run_id,
        "model_id": first["model_id"],
        "champion": True,
    }
    assert second["version"] == 2 and second["champion"] is False and second["model_id"] != first["model_id"]
    client = MlflowClient(uri)
    v1 = client.get_model_version(name, "1")
    assert v1.run_id == run_id and v1.tags["l2rclip.decision"] == "promoted"
    assert {k: v1.tags[k] for k in ("l2rclip.fold", "l2rclip.val/mae", "l2rclip.is_clip", "l2rclip.backbone")} == {
        "l2rclip.fold": "0",
        "l2rclip.val/mae": "1.5",
        "l2rclip.is_clip": "false",
        "l2rclip.backbone": "L2RCLIP-Tiny",
    }
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
    assert v2.description == (
        "Promoted to champion (replacing version 1): val/mae 0.9 < 1.1\n\n"
        f"Trained in run {run_id} (fold 1) of pipeline run {parent}: the fold's metrics are "
        "on its run, the cross-validated test means (`test/<metric>_mean`) on the pipeline "
        "run."
    )

    demo = tmp_path / "demo"
    generate_demo(demo, n_per_rank=1, image_size=64)
    paths = sorted(demo.rglob("*.png"))[:4]
    local = Predictor.load(model_dir).predict_paths(paths, progress=False)
    for uri_form in (f"models:/{name}@champion", f"models:/{name}/1"):
        registered = Predictor.load(uri_form, tracking_uri=uri).predict_paths(paths, progress=False)
        np.testing.assert_allclose(registered[NUMBERS].to_numpy(float), local[NUMBERS].to_numpy(float), atol=1e-6)


def test_unknown_model(store):
    uri, _, _ = store
    assert champion("l2rclip-nothing", uri) is None
    with pytest.raises(ModelFileError, match=r"models:/l2rclip-nothing@champion: cannot fetch the model"):
        Predictor.load("models:/l2rclip-nothing@champion", tracking_uri=uri)


def fake_pipeline_outputs(
    root: Path, uri: str | None, val_scores: dict[int, dict[str, float]]
) -> tuple[Path, Path, str | None]:
    """Train and report outputs of a finished pipeline run, with real MLflow parent and child runs.

    With `uri` None, training could not reach MLflow: no run and no run handle (as the train stage).
    """
    tracker = Tracker(uri, experiment="stage-test") if uri else None
    parent = tracker.parent_run(f"stage-key-{root.name}", "csv pipeline", {}, {}) if tracker else None
    model = save_tiny_model(root / "model")
    for fold, best in val_scores.items():
        train = root / "folds" / str(fold) / "train"
        shutil.copytree(model, train / "best")
        (train / "summary.json").write_text(json.dumps({"best": best, "data_version": "d4t4"}))
        if tracker:
            fold_run = tracker.child_run(parent, f"fold {fold}", {}, {"l2rclip.fold": fold})
            tracker.end_run(fold_run)  # training and evaluation are over
            tracker.write_handle(train, fold_run, parent)
    if tracker:
        tracker.end_run(parent)  # so is the report
    report = root / "report" / "metrics.json"
    report.parent.mkdir()
    report.write_text(
        json.dumps(
            {
                "test/mae": {"mean": 1.25, "std": 0.1, "folds": [1.2, 1.3]},
                "backbone": "L2RCLIP-Tiny",
                "is_clip": False,
            }
        )
    )
    return root / "folds", report, parent


def test_register_stage_picks_the_best_validation_fold(store, tmp_path):
    uri, _, _ = store
    folds, report, parent = fake_pipeline_outputs(
        tmp_path, uri, {0: {"val/mae": 1.1, "val/accuracy": 0.6}, 1: {"val/mae": 0.8, "val/accuracy": 0.4}}
    )
    params = Params(
        folds=(0, 1), data=DataConfig(source="csv", root="data/faces"), train=TrainConfig(select_metric="accuracy")
    )
    assert choose_fold(params, folds)[:2] == (0, 0.6)  # higher accuracy is better
    params = dataclasses.replace(params, train=TrainConfig(select_metric="mae"))

    result = register_best(params, folds, report, tmp_path / "register")

    assert json.loads((tmp_path / "register" / "registered.json").read_text()) == result
    assert result["registered"] and result["fold"] == 1 and result["val/mae"] == 0.8
    fold_run = json.loads((folds / "1" / "train" / "tracking.json").read_text())["run_id"]
    assert (result["name"], result["version"], result["run_id"], result["champion"]) == (
        "l2rclip-faces",
        1,
        fold_run,
        True,
    )
    tags = MlflowClient(uri).get_model_version("l2rclip-faces", "1").tags
    assert tags == {  # what identifies the version; the test means are metrics of the pipeline run
        "l2rclip.source": "csv",
        "l2rclip.fold": "1",
        "l2rclip.select_metric": "mae",
        "l2rclip.val/mae": "0.8",
        "l2rclip.data_version": "d4t4",
        "l2rclip.params_hash": fingerprint(params),
        "l2rclip.holdout_spec": holdout_spec(params.split.holdout_fraction, params.split.holdout_salt),
        "l2rclip.is_clip": "false",
        "l2rclip.backbone": "L2RCLIP-Tiny",
        "l2rclip.decision": "promoted",
        "l2rclip.decision_reason": "first version of l2rclip-faces: there was no champion yet",
        "l2rclip.ranks": json.dumps(
            {
                "labels": list(range(1, 11)),
                "names": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"],
                "values": [float(v) for v in range(1, 11)],
            },
            separators=(",", ":"),
        ),
    }
    assert not MlflowClient(uri).get_run(parent).outputs.model_outputs  # the parent run logged no model

    off = dataclasses.replace(params, tracking=TrackingConfig(enabled=False))
    skipped = register_best(off, folds, report, tmp_path / "off")
    assert not skipped["registered"] and skipped["reason"] == "tracking.enabled is false" and skipped["fold"] == 1


def test_the_model_is_logged_in_the_fold_run_that_trained_it_and_linked_both_ways(store, tmp_path):
    uri, _, _ = store
    folds, report, parent = fake_pipeline_outputs(tmp_path, uri, {0: {"val/mae": 1.1}, 1: {"val/mae": 0.9}})
    fold_run = json.loads((folds / "1" / "train" / "tracking.json").read_text())["run_id"]
    client = MlflowClient(uri)
    trained = client.get_run(fold_run).info
    params = Params(folds=(0, 1), data=DataConfig(source="csv", root="data/linked"))

    result = register_best(params, folds, report, tmp_path / "register")

    version = client.get_model_version(result["name"], str(result["version"]))
    logged = client.get_logged_model(result["model_id"])
    assert version.run_id == logged.source_run_id == fold_run  # version -> run, logged model -> run
    assert version.source == f"models:/{logged.model_id}"  # version -> logged model (SQLite keeps no model_id)
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "l2rclip-linked", "version": 1}]
    run = client.get_run(fold_run)
    assert [output.model_id for output in run.outputs.model_outputs] == [logged.model_id]  # run -> logged model
    experiment = run.info.experiment_id
    assert [
        m.model_id
        for m in client.search_logged_models([experiment], filter_string=(f"source_run_id = '{fold_run}'"))
    ] == [logged.model_id]
    assert (run.info.status, run.info.end_time) == (trained.status, trained.end_time)  # the fold's duration stays
    for run_id in (fold_run, parent):
        assert client.get_run(run_id).data.tags["l2rclip.registered_model"] == "models:/l2rclip-linked/1"
    assert f"Trained in run {fold_run} (fold 1) of pipeline run {parent}" in version.description
    assert client.get_run(fold_run).data.tags[PARENT_TAG] == parent


def test_variants_register_nothing(store, tmp_path):
    """The switch the ablation and fan-out flows set: the stage is done, with the reason, and no version exists."""
    assert variant_settings({"loss.cop": 0.0}, ["folds=[0]"]) == [NO_REGISTER, "loss.cop=0.0", "folds=[0]"]
    assert NO_REGISTER == "tracking.register=false"
    assert variant_settings({}, ["tracking.register=true"])[-1] == "tracking.register=true"  # a later -S wins
    uri, _, _ = store
    folds, report, _ = fake_pipeline_outputs(tmp_path, uri, {0: {"val/mae": 1.1}})
    params = Params(
        folds=(0,), data=DataConfig(source="csv", root="data/variant"), tracking=TrackingConfig(register=False)
    )

    result = register_best(params, folds, report, tmp_path / "register")

    assert json.loads((tmp_path / "register" / "registered.json").read_text()) == result
    assert not result["registered"] and result["reason"].startswith("tracking.register is false")
    client = MlflowClient(uri)
    assert client.search_model_versions("name='l2rclip-variant'") == []
    fold_run = json.loads((folds / "0" / "train" / "tracking.json").read_text())["run_id"]
    assert not client.get_run(fold_run).outputs.model_outputs


@pytest.mark.parametrize(
    ("root", "source", "explicit", "name"),
    [
        ("data/demo", "demo", None, "l2rclip-demo"),  # the demo keeps the name it always had
        ("data/my_faces/", "csv", None, "l2rclip-my_faces"),
        ("../shared/data/fgnet", "fgnet", None, "l2rclip-fgnet"),
        ("/srv/faces 2024@lab", "folder", None, "l2rclip-faces_2024_lab"),  # what models:/<name>@alias accepts
        (".", "csv", None, "l2rclip-csv"),  # no folder name of its own: never the clone's location
        ("data/my_faces", "csv", "faces-prod", "faces-prod"),
        ("data/my_faces", "csv", "", "l2rclip-my_faces"),
    ],
)
def test_the_registered_model_is_named_after_the_dataset(root, source, explicit, name):
    params = from_dict(Params, {"data": {"source": source, "root": root}, "tracking": {"model_name": explicit}})
    assert model_name(params) == name


def test_a_model_name_mlflow_or_a_models_uri_cannot_hold_is_refused():
    with pytest.raises(ConfigError, match=r"'tracking.model_name': expected letters, .* found 'faces/prod'"):
        from_dict(Params, {"tracking": {"model_name": "faces/prod"}})


def test_the_report_compares_only_with_a_committed_report_of_the_same_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the report reads the committed metrics with `git show HEAD:<path>`
    subprocess.run(["git", "init", "-q"], check=True)
    metrics, train = Path("outputs/metrics"), Path("outputs/folds")
    metrics.mkdir(parents=True)
    (train / "0" / "train").mkdir(parents=True)
    (train / "0" / "train" / "summary.json").write_text(json.dumps({"data_version": "v1"}))

    def run(root: str, mae: float) -> str:
        (metrics / "fold_0.json").write_text(
            json.dumps(
                {
                    "test/mae": mae,
                    "test/mae_median_baseline": 2.0,
                    "test/accuracy": 0.5,
                    "backbone": "L2RCLIP-Tiny",
                    "is_clip": False,
                }
            )
        )
        params = from_dict(Params, {"folds": [0], "data": {"source": "csv", "root": root}})
        report_stage(params, metrics, Path("outputs/report"), train)
        subprocess.run(["git", "add", "-A"], check=True)
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", root], check=True)
        return Path("outputs/report/report.md").read_text().split("## Change since the last committed run")[1]

    assert "No committed report" in run("data/faces_a", 1.5)
    assert json.loads(Path("outputs/report/metrics.json").read_text())["dataset"] == {
        "source": "csv",
        "model_name": "l2rclip-faces_a",
        "data_version": "v1",
    }
    other = run("data/faces_b", 1.0)
    assert (
        "The previous committed report is of another dataset (source csv, l2rclip-faces_a; now source csv, "
        "l2rclip-faces_b); not compared."
    ) in other and "| mae |" not in other
    same = run("data/faces_b", 0.75)
    assert "| mae | 1.0000 | 0.7500 | -0.2500 |" in same and "other data" not in same
    (train / "0" / "train" / "summary.json").write_text(json.dumps({"data_version": "v2"}))
    changed = run("data/faces_b", 0.5)
    assert "Same dataset (l2rclip-faces_b), other data: version v1 then, v2 now." in changed
    assert "| mae | 0.7500 | 0.5000 | -0.2500 |" in changed


def closed_port_uri() -> str:
    """An http URI on which nothing listens (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def offline_pipeline(tmp_path, monkeypatch) -> dict:
    """Outputs of a pipeline whose training could not reach MLflow, and a params file for the stage."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # Tracker sets them for http stores; restored afterwards
    folds, report, _ = fake_pipeline_outputs(tmp_path, None, {0: {"val/mae": 1.1}, 1: {"val/mae": 0.9}})
    params = tmp_path / "params.yaml"
    offline = Params(
        folds=(0, 1),
        data=DataConfig(source="csv", root="data/offline"),
        tracking=TrackingConfig(experiment="offline-test"),
    )
    params.write_text(yaml.safe_dump(to_dict(offline)))
    args = [
        "--params",
        str(params),
        "--folds-dir",
        str(folds),
        "--report",
        str(report),
        "--out",
        str(tmp_path / "register"),
    ]
    return {"root": tmp_path, "folds": folds, "args": args, "out": tmp_path / "register" / "registered.json"}


def test_register_fails_with_the_reason_while_mlflow_is_down_then_registers(
    store, offline_pipeline, monkeypatch, capsys
):
    uri, _, _ = store
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
    assert PARENT_TAG not in run.data.tags and run.info.status == "FINISHED"  # no fold run: the parent, ended
    assert [output.model_id for output in run.outputs.model_outputs] == [result["model_id"]]
    assert digest(offline_pipeline["folds"]) == before


def test_register_names_the_unreachable_store_of_a_tracked_training(offline_pipeline, capsys):
    down = closed_port_uri()
    handle = offline_pipeline["folds"] / "1" / "train" / "tracking.json"
    handle.write_text(
        json.dumps({"tracking_uri": down, "experiment_id": "1", "parent_run_id": "abc", "run_id": "def"})
    )
    assert main(offline_pipeline["args"]) == 1
    err = capsys.readouterr().err
    assert f"the training's MLflow run def (in {handle}) cannot be reached: connect failed on {down}" in err
    assert "Connection refused" in err and not offline_pipeline["out"].exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dvc_keeps_register_pending_while_mlflow_is_down(store, offline_pipeline):
    """A register that failed is not recorded: `dvc status` shows it, and the next `dvc repro` registers."""
    uri, _, _ = store
    repo = offline_pipeline["root"]
    stage = {
        "cmd": " ".join(["python -m l2rclip.stages.register", *offline_pipeline["args"]]),
        "deps": ["folds", "report/metrics.json"],
        "outs": [{"register/registered.json": {"cache": False}}],
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"register": stage}}))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "DVC_NO_ANALYTICS": "1",
    }

    def dvc(*args: str, store_uri: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dvc", *args],
            cwd=repo,
            capture_output=True,
            text=True,
            env={**env, "MLFLOW_TRACKING_URI": store_uri},
            timeout=300,
            check=False,
        )

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
