"""The house rules of the code base: layered imports, self-contained test files, stable public names."""

import ast
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.project import ROOT

TESTS = ROOT / "tests"


def test_no_test_file_imports_another_test_file():
    test_modules = {path.stem for path in TESTS.rglob("test_*.py")}
    offenders = []
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
                for name in names
                if name.split(".")[-1] in test_modules
            ]
    assert not offenders, "shared helpers belong in tests/support: " + "; ".join(offenders)


def test_no_module_imports_a_higher_layer():
    """The layers contract in pyproject.toml ([tool.importlinter]) holds."""
    linter = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if linter is None:
        pytest.fail("lint-imports is missing: install the dev extra (pip install -e '.[dev]')")
    done = subprocess.run([linter, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_models_registered_before_the_move_still_load(tmp_path):
    """Registered models carry a models-from-code file that imports `l2rclip.serving.L2RCLIPModel`."""
    import mlflow.models.model as mlflow_model

    old_code = tmp_path / "served_model.py"
    old_code.write_text(
        "from mlflow.models import set_model\n\nfrom l2rclip.serving import L2RCLIPModel\n\n"
        "set_model(L2RCLIPModel())\n"
    )
    runpy.run_path(str(old_code))
    from l2rclip.serving.pyfunc import L2RCLIPModel

    assert isinstance(mlflow_model.__mlflow_model__, L2RCLIPModel)
