"""Which code, data and experiment made a run: git commit and state, DVC experiment, data version.

These are plain facts read from git, DVC's environment and the prepared tables; MLflow runs carry
them as tags (`l2rclip.tracking.runs`), resumable training states and registered versions as keys.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from l2rclip.config import Params, to_flat_dict

DVC_EXP_TAG = "l2rclip.dvc_exp"  # the DVC experiment's name (DVC_EXP_NAME inside `dvc exp run`)
DVC_BASELINE_TAG = "l2rclip.dvc_baseline"  # the commit the experiment started from
DVC_EXP_COMMIT_TAG = "l2rclip.dvc_exp_commit"  # the experiment's own commit (tag_experiment_commits)


def data_version(prepared: Path) -> str:
    """A short hash of the prepared tables: which images, labels and splits a run used."""
    digest = hashlib.sha256()
    for name in ("images.csv", "splits.csv"):
        digest.update((prepared / name).read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(params: Params, *parts: Any) -> str:
    """A hash of the params and extra parts (fold, data version) that identifies a training run."""
    payload = json.dumps([to_flat_dict(params), *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def pipeline_key(flat_params: dict, data_version: str | None) -> str:
    """Short stable hash of the resolved params and the data version.

    Every stage process of one pipeline run computes the same key and so finds the same parent run.
    """
    blob = json.dumps({"params": flat_params, "data": data_version}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def git_commit(cwd: str | Path = ".") -> str | None:
    """The HEAD commit of the repository at `cwd`, or None when it is not a git checkout."""
    return _git(cwd, "rev-parse", "HEAD")


def dvc_experiment() -> dict[str, str | None]:
    """The DVC experiment this process runs in: `name` and `baseline` (None outside `dvc exp run`).

    `dvc exp run` gives every stage `DVC_EXP_NAME` and `DVC_EXP_BASELINE_REV` (dvc/env.py).
    """
    return {
        "name": os.environ.get("DVC_EXP_NAME") or None,
        "baseline": os.environ.get("DVC_EXP_BASELINE_REV") or None,
    }


def pipeline_run_name(source: str, version: str) -> str:
    """The parent run's name: the DVC experiment's, else `<data.source> <data version[:7]>`."""
    return dvc_experiment()["name"] or f"{source} {version[:7]}"


def git_state(cwd: str | Path = ".") -> dict[str, str | None]:
    """Tag values that say which code ran: the commit and whether the work tree differed from it.

    The commit is the DVC experiment's baseline inside `dvc exp run` (HEAD otherwise), as
    `mlflow.source.git.commit`. `git_dirty` counts tracked files that differ from it, except what
    DVC itself changes while running: `dvc.lock`, params files (their values are the run's params),
    DVC outputs named in dvc.lock and `.gitignore` files; `l2rclip.git_changed` names the files
    that did count. None values (not a git checkout) leave the tags out.
    """
    commit = dvc_experiment()["baseline"] or git_commit(cwd)
    changed = None if commit is None else _git(cwd, "diff", "--name-only", commit, "--")
    if commit is None or changed is None:
        return {"mlflow.source.git.commit": commit, "git_dirty": None}
    owned = _dvc_owned(cwd, commit)
    counted = [path for path in changed.splitlines() if path and not _is_owned(PurePosixPath(path), owned)]
    return {
        "mlflow.source.git.commit": commit,
        "git_dirty": str(bool(counted)).lower(),
        "l2rclip.git_changed": ", ".join(counted) or None,
    }


def _dvc_owned(cwd: str | Path, commit: str) -> set[PurePosixPath]:
    """Paths (relative to the repository root) DVC writes itself: dvc.lock, params files, outputs.

    Read from dvc.lock as it is now and as committed in `commit` (DVC rewrites it while running).
    """
    owned = {PurePosixPath("dvc.lock"), PurePosixPath("params.yaml")}
    root = _git(cwd, "rev-parse", "--show-toplevel")
    prefix = PurePosixPath(os.path.relpath(Path(cwd).resolve(), root)) if root else PurePosixPath(".")
    try:
        texts = [(Path(cwd) / "dvc.lock").read_text(encoding="utf-8")]
    except OSError:
        texts = []
    texts.append(_git(cwd, "show", f"{commit}:./dvc.lock") or "")
    for text in texts:
        try:
            stages = (yaml.safe_load(text) or {}).get("stages") or {}
        except (yaml.YAMLError, AttributeError):
            continue
        for stage in stages.values() if isinstance(stages, dict) else ():
            owned.update(prefix / name for name in (stage.get("params") or {}))
            owned.update(
                prefix / out["path"] for out in stage.get("outs") or () if isinstance(out, dict) and "path" in out
            )
    return owned


def _is_owned(path: PurePosixPath, owned: set[PurePosixPath]) -> bool:
    return path.name == ".gitignore" or any(path == o or o in path.parents for o in owned)


def source_tags(entry: str, cwd: str | Path = ".") -> dict[str, str | None]:
    """MLflow's standard run tags (who, what, which commit) plus the DVC experiment, for stage `entry`.

    `entry` is the command that ran (e.g. `l2rclip.stages.train`), `mlflow.source.name`.
    """
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no user name in the environment or password database
        user = None
    experiment = dvc_experiment()
    return {
        "mlflow.source.name": entry,
        "mlflow.source.type": "LOCAL",
        "mlflow.user": user,
        **git_state(cwd),
        DVC_EXP_TAG: experiment["name"],
        DVC_BASELINE_TAG: experiment["baseline"],
    }


def _git(cwd: str | Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
