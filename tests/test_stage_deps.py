"""dvc.yaml's code deps of each stage cover every l2rclip module the stage imports.

A stage reruns exactly when its code changes only if DVC knows its code: a module the stage imports
but dvc.yaml does not list would let an edit keep a stale result (the train stage once missed
config.py, methods.py and data/dataset.py). The import closure is measured in a fresh interpreter,
as `python -m l2rclip.stages.<name>` would load it. The resume fingerprint hashes the same closure.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def imported_sources(module: str) -> set[str]:
    code = (f"import importlib, sys; importlib.import_module({module!r}); "
            "print('\\n'.join(m.__file__ for n, m in list(sys.modules.items()) "
            "if n.split('.')[0] == 'l2rclip' and getattr(m, '__file__', None)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {Path(line).resolve().relative_to(ROOT).as_posix() for line in out.split()}


def trivial(path: str) -> bool:
    """A package __init__ holding only a docstring and a version string changes no computation."""
    body = ast.parse((ROOT / path).read_text()).body
    return Path(path).name == "__init__.py" and all(
        isinstance(node, ast.Expr | ast.Assign) and isinstance(getattr(node, "value", None), ast.Constant)
        for node in body)


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_code_deps_cover_its_imports(stage):
    spec = STAGES[stage].get("do", STAGES[stage])
    module = spec["cmd"].split("python -m ", 1)[1].split()[0]
    missing = sorted(p for p in imported_sources(module) if not trivial(p) and not covered(p, spec["deps"]))
    assert not missing, f"dvc.yaml stage {stage} imports but does not depend on: {', '.join(missing)}"
