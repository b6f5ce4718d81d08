"""dvc.yaml's code deps of each stage cover every l2rclip module the stage imports.

A stage reruns exactly when its code changes only if DVC knows its code: a module the stage imports
but dvc.yaml does not list would let an edit keep a stale result (the train stage once missed
config.py, methods.py and data/dataset.py). The closure comes from `l2rclip.training.code_deps`, which the
train stage's resume identity hashes too; a second check runs the real interpreter once to make
sure the static closure misses nothing that `python -m l2rclip.stages.train` actually loads.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.project import ROOT

from l2rclip.training.code_deps import import_closure

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_module(stage: str) -> str:
    spec = STAGES[stage].get("do", STAGES[stage])
    return spec["cmd"].split("python -m ", 1)[1].split()[0]


def trivial(path: Path) -> bool:
    """A package __init__ holding only a docstring and a version string changes no computation."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(
        isinstance(node, ast.Expr | ast.Assign) and isinstance(getattr(node, "value", None), ast.Constant)
        for node in body
    )


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_code_deps_cover_its_imports(stage):
    deps = STAGES[stage].get("do", STAGES[stage])["deps"]
    files = [p.relative_to(ROOT).as_posix() for p in import_closure(stage_module(stage)) if not trivial(p)]
    missing = sorted(p for p in files if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage} imports but does not depend on: {', '.join(missing)}"


def test_the_static_closure_holds_everything_the_train_stage_loads():
    code = (
        "import sys, l2rclip.stages.train; print('\\n'.join(m.__file__ for n, m in list(sys.modules.items()) "
        "if n.split('.')[0] == 'l2rclip' and getattr(m, '__file__', None)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert {Path(p).resolve() for p in loaded} <= set(import_closure("l2rclip.stages.train"))
