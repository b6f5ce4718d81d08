"""A scratch copy of the project for tests that run its DVC pipeline, and the commands they run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from l2rclip.config import load_params, to_dict

ROOT = Path(__file__).resolve().parents[2]  # the project (this file is tests/support/project.py)


BIN = Path(sys.executable).parent


FIXTURE_PARAMS = ROOT / "tests" / "fixtures" / "params.yaml"  # never the repo's params.yaml


SMALL = {
    "folds": [1],  # one of two folds: the pipeline runs the folds listed, not necessarily all
    "data": {"demo": {"n_per_rank": 8, "image_size": 64}},
    "split": {"n_folds": 2, "val_fraction": 0.25, "calib_fraction": 0.3},
    "model": {"fallback": {"epochs": 2}},
    "conformal": {"alpha": [0.2]},  # about 10 calibration images: enough for 80 % intervals
    "train": {"batch_size": 16},
    "tracking": {"experiment": "pipeline-test"},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def environment(tmp_path: Path) -> dict:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }


def run(command: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def project_params(override: dict) -> dict:
    """The tests' demo params (tests/fixtures/params.yaml, every key filled in from l2rclip.config) merged
    with `override`: what a test's project runs with, whatever the user put in the repo's params.yaml."""
    return merge(to_dict(load_params(FIXTURE_PARAMS)), override)


def copy_project(repo: Path, override: dict) -> Path:
    """The project's pipeline and code (its dependencies) in `repo`, with the fixture params merged with
    `override` as its params.yaml."""
    repo.mkdir(parents=True)
    shutil.copytree(ROOT / "l2rclip", repo / "l2rclip", ignore=shutil.ignore_patterns("__pycache__"))
    for name in (".dvcignore", ".gitignore"):  # .gitignore: files stages write beside outputs
        shutil.copy(ROOT / name, repo / name)
    # The demo CLIP ships with the package (the `pretrain` stage's git-tracked output): a copy without
    # the repository's dvc.lock would retrain it (minutes) before any stage that reads l2rclip/models.
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    pipeline["stages"].pop("pretrain", None)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (repo / "params.yaml").write_text(yaml.safe_dump(project_params(override), sort_keys=False))
    return repo
