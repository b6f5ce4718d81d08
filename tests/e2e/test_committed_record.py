"""The committed record (dvc.lock) matches the committed code and params; a fresh clone says how to pull.

A fresh clone has the code, params and dvc.lock but none of the outputs. `dvc status` there may
report outputs as missing (and the stages that read them as having deleted deps), never a code,
params or command change: that would mean dvc.lock records a run of other code, and `dvc repro`
would retrain everything. After a change of code or params, rerun the pipeline (`make demo`) and
commit the new dvc.lock with the code.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.project import ROOT

from l2rclip.dvc_remote import remote_status

DVC = str(Path(sys.executable).with_name("dvc"))


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> Path:
    clone = tmp_path_factory.mktemp("clone") / "l2rclip"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    return clone


def stage_outputs(clone: Path) -> set[str]:
    """The outputs dvc.lock records that the clone lacks: deps on them (or on folders holding them) are
    missing data, not changed code. Outputs git keeps (the demo CLIP's weights) are present and still count."""
    stages = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    paths = {out["path"] for stage in stages.values() for out in stage.get("outs", [])}
    return {path for path in paths if not (clone / path).exists()}


def produced(path: str, outputs: set[str]) -> bool:
    return any(
        path == out or out.startswith(path.rstrip("/") + "/") or path.startswith(out + "/") for out in outputs
    )


def stale_entries(status: dict, outputs: set[str]) -> list[str]:
    """What `dvc status --json` reports beyond missing outputs and the deps they leave missing or partial."""
    stale = []
    for stage, changes in status.items():
        for change in changes if isinstance(changes, list) else [changes]:
            if not isinstance(change, dict):
                stale.append(f"{stage}: {change}")
                continue
            for kind, detail in change.items():
                if kind == "changed outs" and set(detail.values()) <= {"not in cache", "deleted"}:
                    continue
                if kind == "changed deps":
                    detail = {
                        path: state
                        for path, state in detail.items()
                        if state != "deleted" and not produced(path, outputs)
                    }
                    if not detail:
                        continue
                stale.append(f"{stage}: {kind} {detail}")
    return stale


def test_a_fresh_clone_finds_dvc_lock_in_step_with_code_and_params(fresh_clone):
    done = subprocess.run([DVC, "status", "--json"], cwd=fresh_clone, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    stale = stale_entries(json.loads(done.stdout or "{}"), stage_outputs(fresh_clone))
    assert not stale, (
        "dvc.lock records code or params other than the committed ones; rerun the pipeline "
        "(make demo) and commit dvc.lock:\n" + "\n".join(stale[:20])
    )


def test_pull_without_a_reachable_remote_fails_and_the_check_says_what_to_set(fresh_clone):
    status = remote_status(fresh_clone)
    if status.usable:
        pytest.skip(f"the default remote is reachable from here: {status.message}")
    done = subprocess.run([DVC, "pull"], cwd=fresh_clone, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0  # README: a clone cannot pull from a remote that is not there
    assert status.usable is False and "dvc remote add -d" in status.message
    assert str(Path(status.url).name) in status.message
