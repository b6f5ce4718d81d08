"""What a logged model needs to run outside this project: the l2rclip code it carries and its pip requirements.

A registered model is installed where MLflow users deploy: `mlflow models serve --env-manager
virtualenv` (MLflow's default) or `uv`, and the image `mlflow models generate-dockerfile` /
`build-docker` writes. Each builds a fresh environment from the model's `requirements.txt` and
`python_env.yaml`, so both must resolve from a public index, and the l2rclip code must come with
the model: l2rclip is on no index.

The code travels as MLflow `code_paths`: the `l2rclip` package folder is copied into the model's
`code/` folder, which MLflow puts first on `sys.path` before it runs the models-from-code file.
The alternative, a wheel of the package built at log time and named in the requirements, was
rejected: the wheel's metadata requires everything the *project* needs (DVC, Prefect, ...), which
pip would install into every serving environment, and building it needs the source tree and a
build backend at log time, which a model logged from an installed (non-editable) l2rclip lacks.

The requirements are derived, not listed by hand: starting at `served_model.py`, every l2rclip
module it imports (at any depth, function-level imports included) is parsed, and each third-party
module those import is mapped to its installed distribution and pinned to the installed version
(MLflow's own convention: the model runs with what it was logged and tested with). A new import
in the served code therefore reaches the requirements by itself; `tests/test_serving.py` checks
the set against what a fresh interpreter really imports.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from importlib.metadata import packages_distributions, version
from pathlib import Path

PACKAGE = "l2rclip"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the l2rclip package folder, logged as the model's code
ENTRY_MODULE = "l2rclip.serving.served_model"  # what MLflow runs when it loads the model


def _module_file(module: str) -> Path | None:
    """The source file of an l2rclip module (package `__init__.py` or module `.py`), None if there is none."""
    relative = Path(*module.split(".")[1:])
    for candidate in (PACKAGE_DIR / relative / "__init__.py", (PACKAGE_DIR / relative).with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(file: Path, module: str) -> set[str]:
    """Absolute names of everything `file` (the source of `module`) imports, at any nesting level."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), filename=str(file))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from .x import y` inside `package`
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)  # may be submodules
    return names


@cache
def served_imports(entry: str = ENTRY_MODULE) -> tuple[frozenset[str], frozenset[str]]:
    """(l2rclip modules, third-party top-level modules) that loading and running the served model imports.

    Follows the l2rclip imports of `entry` transitively over the source files; standard-library
    modules are left out. Conservative: a function-level import counts even if no request reaches it.
    """
    seen: set[str] = set()
    third_party: set[str] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in seen or (file := _module_file(module)) is None:
            continue
        seen.add(module)
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        for name in _imports(file, module):
            top = name.split(".")[0]
            if top == PACKAGE:
                todo.append(name)
            elif top and top not in sys.stdlib_module_names:
                third_party.add(top)
    return frozenset(seen), frozenset(third_party)


def requirements(entry: str = ENTRY_MODULE) -> list[str]:
    """Pip requirements of the logged model: `dist==version` for every distribution the served code imports.

    Local version labels are dropped (`torch==2.14.1`, not `2.14.1+cu130`: an index serves no local
    labels). A module installed by no distribution here (an optional import guarded at run time)
    is left out. Sorted, for a stable `requirements.txt`.

    Raises:
        ValueError: the entry module is not part of the l2rclip package found at `PACKAGE_DIR`.
    """
    modules, third_party = served_imports(entry)
    if entry not in modules:
        raise ValueError(
            f"expected {entry} to be a module of the l2rclip package in {PACKAGE_DIR}, found no such source file"
        )
    by_module = packages_distributions()  # {top-level module: [distribution, ...]}
    distributions = {dist for module in third_party for dist in by_module.get(module, [])}
    return sorted(f"{dist}=={version(dist).split('+')[0]}" for dist in distributions)
