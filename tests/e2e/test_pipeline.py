"""The pipeline for real: DVC stages in a scratch repository, MLflow on SQLite, a killed training resumed.

Everything runs offline on the tiny fallback backbone with a few demo images, so these tests take
about a minute together while exercising the same commands `make demo` runs.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from support.project import BIN, ROOT, SMALL, copy_project, environment, merge, project_params, run, stages_run

from l2rclip.config import load_params
from l2rclip.evaluation.results import collect, markdown_table, write_between_markers

# Whole pipelines in subprocesses: generous limits for a loaded machine (about a minute when idle).
pytestmark = pytest.mark.timeout(900)


def test_copied_project_params_do_not_depend_on_the_repository_params(tmp_path, monkeypatch):
    """A user's edits to params.yaml (own data, other ranks) never reach a test's project."""
    fake_root = tmp_path / "root"
    shutil.copytree(ROOT / "l2rclip", fake_root / "l2rclip", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, fake_root / name)
    (fake_root / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "folds": [0],
                "ranks": {"start": 16, "stop": 77},
                "data": {"source": "csv", "root": "/my/faces"},
                "split": {"n_folds": 1},
                "tracking": {"experiment": "my-faces"},
            }
        )
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)

    repo = copy_project(tmp_path / "repo", SMALL)

    written = yaml.safe_load((repo / "params.yaml").read_text())
    assert written == project_params(SMALL)
    assert (written["data"]["source"], written["ranks"]["stop"], written["folds"]) == ("demo", 10, [1])
    assert load_params(repo / "params.yaml").tracking.experiment == "pipeline-test"  # a complete, valid file


@pytest.fixture
def scratch_repo(tmp_path):
    """A git + DVC repository holding the project's pipeline, code (as dependencies) and small params."""
    repo = copy_project(tmp_path / "repo", SMALL)
    env = environment(tmp_path)
    run(["git", "init", "-q"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    return repo, env


@pytest.mark.slow  # end to end: the slow tier (make test-all)
def test_dvc_pipeline_reruns_exactly_what_changed_and_tracks_in_mlflow(scratch_repo, tmp_path):
    repo, env = scratch_repo
    first = run(["dvc", "repro"], repo, env)
    assert stages_run(first) == {
        "demo",
        "prepare",
        "preprocess",
        "train@1",
        "calibrate@1",
        "evaluate@1",
        "zero-shot@1",
        "report",
        "curves",
        "register",
    }
    assert "NOT CLIP" in first  # the offline fallback says so plainly
    summary = json.loads((repo / "outputs/report/metrics.json").read_text())
    assert len(summary["test/mae"]["folds"]) == 1 and summary["is_clip"] is False
    assert "PIPELINE CHECK" in (repo / "outputs/report/report.md").read_text()
    figures = repo / "outputs/folds/1/evaluate/figures"
    expected_figures = {"confusion_matrix.png", "calibration.png", "conformal_80.png"}
    assert {p.name for p in figures.glob("*.png")} >= expected_figures
    assert {"test/coverage_ordinal_80", "test/width_residual_80"} <= set(summary)

    assert stages_run(run(["dvc", "repro"], repo, env)) == set()  # nothing changed, nothing runs

    # an ablation as a DVC experiment: reruns exactly train, evaluate, report (and registers the new model)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "baseline"], repo, env)
    ablation = run(["dvc", "exp", "run", "--name", "cop-half", "-S", "loss.cop=0.5"], repo, env)
    assert stages_run(ablation) == {"train@1", "calibrate@1", "evaluate@1", "report", "curves", "register"}
    rows = collect(repo, prefix="cop-")
    assert [r["name"] for r in rows] == ["cop-half"] and rows[0]["params"]["loss"]["cop"] == 0.5
    table = markdown_table(rows)
    assert "| cop-half | l2rclip | L2RCLIP-Tiny (random init, NOT CLIP) | 1 |" in table

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("pipeline-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(children) == 2  # one parent per pipeline run, a child per fold
    latest = max(parents, key=lambda r: r.info.start_time)
    assert "test/mae_mean" in latest.data.metrics and latest.data.params["loss.cop"] == "0.5"
    child = next(r for r in children if r.data.tags["mlflow.parentRunId"] == latest.info.run_id)
    assert child.data.tags["l2rclip.pipeline_check"] == "true" and "test/mae" in child.data.metrics
    assert len(client.get_metric_history(child.info.run_id, "val/mae")) == 2  # per epoch
    # named after the DVC experiment; its code is the baseline's (-S and DVC's own writes are not "dirty")
    baseline = run(["git", "rev-parse", "HEAD"], repo, env).strip()
    assert (latest.info.run_name, child.info.run_name) == ("cop-half", "cop-half fold 1")
    assert {
        k: latest.data.tags.get(k)
        for k in ("l2rclip.dvc_exp", "mlflow.source.git.commit", "git_dirty", "l2rclip.git_changed")
    } == {
        "l2rclip.dvc_exp": "cop-half",
        "mlflow.source.git.commit": baseline,
        "git_dirty": "false",
        "l2rclip.git_changed": None,
    }
    first = min(parents, key=lambda r: r.info.start_time)
    assert first.info.run_name.startswith("demo ") and "l2rclip.dvc_exp" not in first.data.tags
    tagged = run([str(BIN / "l2rclip"), "tag-commits", "--tracking-uri", env["MLFLOW_TRACKING_URI"]], repo, env)
    assert "tagged 2 MLflow runs" in tagged  # the experiment's parent and fold run
    refs = run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"], repo, env).split()
    exp_commit = refs[refs.index(next(r for r in refs if r.endswith("/cop-half"))) - 1]
    for run_id in (latest.info.run_id, child.info.run_id):
        assert client.get_run(run_id).data.tags["l2rclip.dvc_exp_commit"] == exp_commit


def train_command(params: Path, prepared: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "l2rclip.stages.train",
        "--params",
        str(params),
        "--fold",
        "0",
        "--prepared",
        str(prepared),
        "--out",
        str(out),
    ]


@pytest.mark.slow  # end to end: the slow tier (make test-all)
def test_training_killed_mid_epoch_resumes_to_the_same_result(tmp_path):
    env = environment(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            merge(
                SMALL,
                {
                    "data": {"root": str(tmp_path / "demo"), "demo": {"n_per_rank": 20}},
                    "model": {"fallback": {"epochs": 4}},  # a random fallback's epochs
                    "train": {"batch_size": 4, "epochs": 4},  # the demo CLIP's (the default fallback)
                    "tracking": {"experiment": "resume"},
                },
            )
        )
    )
    run(
        [
            sys.executable,
            "-m",
            "l2rclip.stages.prepare",
            "--params",
            str(params),
            "--out",
            str(tmp_path / "prepared"),
        ],
        tmp_path,
        env,
    )

    reference = tmp_path / "uninterrupted"
    run(train_command(params, tmp_path / "prepared", reference), tmp_path, env)

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(
        train_command(params, tmp_path / "prepared", resumed),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = resumed / "last" / "state.json"
    deadline = time.monotonic() + 300
    while not state.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # somewhere inside epoch 2
    process.wait()
    killed_at = json.loads(state.read_text())["epoch"]
    assert 1 <= killed_at < 4, "the kill must interrupt training"
    assert not (resumed / "summary.json").exists()
    killed_run = json.loads((resumed / "tracking.json").read_text())["run_id"]

    output = run(train_command(params, tmp_path / "prepared", resumed), tmp_path, env)
    assert f"resuming from {resumed / 'last'} after epoch {killed_at}" in output
    # the resumed process continues the killed one's MLflow run, and ends it
    assert json.loads((resumed / "tracking.json").read_text())["run_id"] == killed_run
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(killed_run).info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(killed_run, "val/mae")} == {1, 2, 3, 4}
    for name in ("best/model.safetensors", "last/model.safetensors", "last/optimizer.pt"):
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name
    # no timings in the outputs: the resumed run's files are those of the uninterrupted one
    for name in ("history.csv", "summary.json", "last/state.json"):
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name
    timings = json.loads((tmp_path / "resumed_timings.json").read_text())
    assert len(timings["processes"]) == 2 and timings["seconds"] == pytest.approx(
        sum(p["seconds"] for p in timings["processes"])
    )  # the total counts the killed process too


def test_results_table_written_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- t:start -->\nold\n<!-- t:end -->\nafter\n")
    write_between_markers(readme, "t", "| new |\n")
    assert readme.read_text() == "intro\n<!-- t:start -->\n| new |\n<!-- t:end -->\nafter\n"
    with pytest.raises(ValueError, match="expected the markers"):
        write_between_markers(readme, "other", "x")
    with pytest.raises(ValueError, match="no experiments"):
        markdown_table([])


@pytest.mark.slow
def test_every_method_runs_as_a_dvc_experiment(scratch_repo):
    """`dvc exp run -S model.method=<each>` on the demo set, as docs/pipeline.md documents it."""
    repo, env = scratch_repo
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "baseline"], repo, env)
    methods = ["l2rclip", "ordinalclip", "coop", "zero_shot", "linear_probe", "coral", "corn"]
    for method in methods:
        run(["dvc", "exp", "run", "--name", f"method-{method}", "-S", f"model.method={method}"], repo, env)
    rows = {row["name"]: row for row in collect(repo, prefix="method-")}
    assert sorted(rows) == sorted(f"method-{m}" for m in methods)
    for method in methods:
        metrics = rows[f"method-{method}"]["metrics"]
        assert metrics["method"] == method and 0.0 <= metrics["test/accuracy"]["mean"] <= 1.0
