"""`dvc repro` means what it says: code edits retrain, reruns change nothing, results can be pulled.

Real DVC in scratch git repositories on the tiny fallback backbone (see test_pipeline.py).
"""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from support.project import ROOT, copy_project, environment, merge, run, stages_run
from support.project import SMALL as PIPELINE_SMALL

pytestmark = pytest.mark.timeout(1200)  # whole pipelines in subprocesses, as in test_pipeline.py

SMALL = merge(PIPELINE_SMALL, {"tracking": {"enabled": False}})
WEIGHTS = "outputs/folds/1/train/best/model.safetensors"


def git_repo(path: Path, env: dict) -> Path:
    copy_project(path, SMALL)
    run(["git", "init", "-q"], path, env)
    run(["dvc", "init", "-q"], path, env)
    shutil.copy(ROOT / ".dvc/config", path / ".dvc/config")  # the project's default remote
    shutil.copy(ROOT / ".gitignore", path / ".gitignore")  # timings and locks are never committed
    return path


def weights(repo: Path) -> dict:
    return load_file(repo / WEIGHTS)


def repro_and_commit(repo: Path, env: dict, message: str) -> None:
    """`dvc repro`, then commit everything it wrote (the run's record)."""
    run(["dvc", "repro"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", message], repo, env)


@pytest.mark.slow  # end to end: the slow tier (make test-all)
def test_code_edit_retrains_and_an_unchanged_rerun_changes_nothing(tmp_path):
    env = environment(tmp_path)
    repo = git_repo(tmp_path / "repo", env)
    repro_and_commit(repo, env, "first run")
    lock, before = (repo / "dvc.lock").read_text(), weights(repo)

    # A forced rerun with nothing changed continues the same computation: every epoch is done.
    forced = run(["dvc", "repro", "-f", "train@1"], repo, env)
    assert "resuming from" in forced and "after epoch 2" in forced
    # Trained again from nothing, the outputs are bit-identical: no timings in DVC's files.
    shutil.rmtree(repo / "outputs/folds/1/train")
    fresh = run(["dvc", "repro"], repo, env)
    assert "resuming" not in fresh and stages_run(fresh) == {"train@1"}  # same outputs: nothing downstream
    assert (repo / "dvc.lock").read_text() == lock
    assert run(["dvc", "metrics", "diff"], repo, env).strip() == ""
    assert run(["git", "status", "--porcelain"], repo, env).strip() == ""
    timings = json.loads((repo / "outputs/folds/1/train_timings.json").read_text())
    assert timings["seconds"] > 0 and sorted(timings["epoch_seconds"]) == ["1", "2"]

    # A real edit of a train dependency: the next repro starts fresh, says why, and the model changes.
    training = repo / "l2rclip/training/loop.py"
    source = training.read_text()
    assert "epoch_seed = self.seed * 10_000 + epoch" in source  # the order and crops of the training batches
    training.write_text(
        source.replace("epoch_seed = self.seed * 10_000 + epoch", "epoch_seed = self.seed * 10_000 + epoch + 1")
    )
    edited = run(["dvc", "repro"], repo, env)
    assert "train@1" in stages_run(edited)
    assert "starting afresh" in edited and "code l2rclip/training/loop.py" in edited
    assert "resuming" not in edited
    after = weights(repo)
    assert any(not before[k].equal(after[k]) for k in before), "retrained weights must differ"


@pytest.mark.slow  # end to end: the slow tier (make test-all)
def test_a_second_clone_pulls_the_results_and_has_nothing_to_run(tmp_path):
    env = environment(tmp_path)
    first = git_repo(tmp_path / "first", env)
    repro_and_commit(first, env, "results")
    run(["dvc", "push"], first, env)
    assert (tmp_path / "l2rclip-dvc-remote").is_dir()  # the default remote lies beside the checkout

    second = tmp_path / "second"
    run(["git", "clone", "-q", str(first), str(second)], tmp_path, env)
    assert not (second / WEIGHTS).exists()
    run(["dvc", "pull"], second, env)
    status = run(["dvc", "status"], second, env)
    assert "up to date" in status, status
    assert (second / WEIGHTS).read_bytes() == (first / WEIGHTS).read_bytes()
    assert stages_run(run(["dvc", "repro"], second, env)) == set()  # nothing retrains
