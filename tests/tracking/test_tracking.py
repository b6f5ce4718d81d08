"""MLflow tracking against a real SQLite store: parent/child runs, logging, handles, failures."""

import logging
import time

import pytest
from mlflow.tracking import MlflowClient

from l2rclip.tracking.provenance import git_state, pipeline_key
from l2rclip.tracking.runs import PARENT_TAG, PIPELINE_KEY_TAG, Tracker


@pytest.fixture()
def uri(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture()
def tracker(uri):
    return Tracker(uri, experiment="test")


def warnings_in(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_pipeline_key_is_stable_and_sensitive():
    key = pipeline_key({"b": 1, "a": (1, 2)}, "v1")
    assert key == pipeline_key({"a": (1, 2), "b": 1}, "v1") and len(key) == 16
    assert key != pipeline_key({"a": (1, 2), "b": 2}, "v1") != pipeline_key({"a": (1, 2), "b": 1}, "v2")


def test_parent_found_or_created_by_key_and_children_nest(tracker, uri, tmp_path):
    parent = tracker.parent_run("k1", "pipeline", {"seed": 0}, {"variant": "full"})
    assert parent and tracker.parent_run("k1", "again", {"seed": 0}, {}) == parent
    assert tracker.parent_run("k2", "other", {"seed": 1}, {}) not in (None, parent)
    children = [tracker.child_run(parent, f"fold-{i}", {"fold": i}, {"l2rclip.fold": str(i)}) for i in range(2)]
    client = MlflowClient(uri)
    parent_run = client.get_run(parent)
    assert parent_run.data.tags[PIPELINE_KEY_TAG] == "k1" and parent_run.data.tags["variant"] == "full"
    assert parent_run.info.artifact_uri.startswith((tmp_path / "mlartifacts" / "test").as_uri())
    found = client.search_runs([parent_run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'")
    assert sorted(r.info.run_id for r in found) == sorted(children)
    assert {r.data.tags["l2rclip.fold"] for r in found} == {"0", "1"}


def test_params_metrics_artifacts_and_tags_land(tracker, uri, tmp_path):
    run = tracker.child_run(tracker.parent_run("k", "p", {}, {}), "fold-0", {}, {})
    tracker.log_params(
        run,
        {
            "model": {"arch": "tiny", "prompt": {"n_context": 8}},
            "labels": (1, 2),
            "root": None,
            "long": "x" * 7000,
        },
    )
    for step, loss in enumerate([1.0, 0.5, float("nan")]):
        tracker.log_metrics(run, {"train/loss": loss, "test/cs@5": 0.9}, step=step)
    tracker.set_tags(run, {**git_state(tmp_path), "stage": "train"})
    (tmp_path / "plot.png").write_bytes(b"png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "preds.csv").write_text("a,b\n")
    tracker.log_artifact(run, tmp_path / "plot.png", "plots")
    tracker.log_artifacts(run, tmp_path / "out", "outputs")
    tracker.log_dict(run, {"mae": 1.5}, "summary.json")
    tracker.end_run(run)
    assert tracker.enabled

    client = MlflowClient(uri)
    data = client.get_run(run).data
    assert data.params["model.arch"] == "tiny" and data.params["model.prompt.n_context"] == "8"
    assert data.params["labels"] == "[1, 2]" and data.params["root"] == "None"
    assert len(data.params["long"]) == 6000
    assert [(m.step, m.value) for m in client.get_metric_history(run, "train/loss")] == [(0, 1.0), (1, 0.5)]
    assert len(client.get_metric_history(run, "test/cs_5")) == 3
    assert data.tags["stage"] == "train" and "mlflow.source.git.commit" not in data.tags  # tmp_path: no repo
    listed = {a.path for a in client.list_artifacts(run)}
    assert listed == {"plots", "outputs", "summary.json"}
    assert [a.path for a in client.list_artifacts(run, "outputs")] == ["outputs/preds.csv"]
    assert client.get_run(run).info.status == "FINISHED"


def test_handle_round_trip_logs_into_same_run(tracker, uri, tmp_path):
    parent = tracker.parent_run("k", "p", {}, {})
    run = tracker.child_run(parent, "fold-0", {}, {})
    path = tracker.write_handle(tmp_path / "fold0", run, parent)
    assert path.name == "tracking.json"

    again, ids = Tracker.from_handle(tmp_path / "fold0")
    assert again.enabled and ids["run_id"] == run and ids["parent_run_id"] == parent
    assert ids["tracking_uri"] == uri and ids["experiment_id"] == tracker._experiment_id
    again.log_metrics(ids["run_id"], {"test/mae": 2.0})
    again.log_metrics(ids["parent_run_id"], {"test/mae_mean": 2.0})
    client = MlflowClient(uri)
    assert client.get_run(run).data.metrics == {"test/mae": 2.0}
    assert client.get_run(parent).data.metrics == {"test/mae_mean": 2.0}


def test_missing_handle_gives_disabled_tracker(tmp_path, caplog):
    tracker, ids = Tracker.from_handle(tmp_path / "nowhere")
    assert not tracker.enabled and ids == {} and len(warnings_in(caplog)) == 1


def test_unreachable_server_disables_quickly_with_one_warning(tmp_path, caplog):
    start = time.monotonic()
    tracker = Tracker("http://127.0.0.1:9")
    assert not tracker.enabled and time.monotonic() - start < 15
    assert tracker.parent_run("k", "p", {"a": 1}, {}) is None
    assert tracker.child_run("x", "c", {}, {}) is None
    tracker.log_metrics("x", {"m": 1.0}, step=1)
    tracker.log_params("x", {"a": 1})
    tracker.set_tags("x", {"t": "v"})
    tracker.log_artifact("x", tmp_path / "missing")
    tracker.log_artifacts("x", tmp_path)
    tracker.log_dict("x", {"a": 1}, "a.json")
    tracker.end_run("x")
    handle = tracker.write_handle(tmp_path, None, None)
    assert handle.is_file()
    assert Tracker.from_handle(tmp_path)[0].enabled is False
    warned = warnings_in(caplog)
    assert len(warned) == 1 and "127.0.0.1:9" in warned[0].getMessage()


def test_mlflow_failure_midway_warns_once_and_disables(tracker, caplog):
    run = tracker.parent_run("k", "p", {}, {})
    assert run and tracker.enabled
    tracker.log_metrics("0" * 32, {"m": 1.0})
    assert not tracker.enabled
    tracker.log_metrics(run, {"m": 1.0})
    tracker.end_run(run)
    warned = warnings_in(caplog)
    assert len(warned) == 1 and "log_metrics" in warned[0].getMessage()


def test_no_run_id_is_a_run_that_was_not_made_and_logs_nothing(tracker, caplog):
    # A stage whose tracking was off when its run was due holds None for the run id.
    tracker.log_metrics(None, {"m": 1.0})
    tracker.set_tags(None, {"t": "v"})
    tracker.end_run(None)
    assert tracker.enabled and tracker.failure is None and not warnings_in(caplog)


def test_disabled_tracker_makes_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(enabled=False)
    assert tracker.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracker.parent_run("k", "p", {}, {}) is None and not (tmp_path / "mlflow.db").exists()


def test_racing_parent_creators_converge_on_the_oldest_run(tracker, uri, monkeypatch):
    first = tracker.parent_run("k", "p", {}, {})
    time.sleep(0.01)  # distinct start times, so "oldest" is unambiguous
    real_find = tracker._find_parents
    calls = iter([[]])  # the first search misses `first`, as if another fold created it meanwhile
    monkeypatch.setattr(tracker, "_find_parents", lambda key: next(calls, None) or real_find(key))
    assert tracker.parent_run("k", "p", {}, {}) == first
    client = MlflowClient(uri)
    alive = client.search_runs([tracker._experiment_id], f"tags.`{PIPELINE_KEY_TAG}` = 'k'")
    assert [r.info.run_id for r in alive] == [first]


def test_missing_epochs_are_logged_once(tracker, uri):
    run = tracker.child_run(tracker.parent_run("k", "p", {}, {}), "fold-0", {}, {})
    history = [{"epoch": e, "phase": "main", "val/mae": 1.0 / e, "train/loss": 2.0 / e} for e in (1, 2, 3)]
    tracker.log_metrics(run, {"val/mae": 1.0, "train/loss": 2.0}, step=1)  # the killed process logged epoch 1
    tracker.log_missing_epochs(run, history)
    client = MlflowClient(uri)
    for key in ("val/mae", "train/loss"):
        assert sorted(m.step for m in client.get_metric_history(run, key)) == [1, 2, 3]
