"""The l2rclip source files a module depends on: its import closure inside the package.

One definition serves two guarantees. dvc.yaml lists each stage's code deps, and a test checks
they cover the closure of the stage's module, so an edit of any code the stage runs reruns it.
The train stage hashes the same closure into its resume identity, so a state saved by other code
is never resumed. The closure is read from the source (`import` statements, including those
inside functions), without importing anything: cheap, and a superset of what a run imports.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # l2rclip/ (this file is l2rclip/training/code_deps.py)
PACKAGE = PACKAGE_ROOT.name


def module_file(name: str) -> Path | None:
    """The source file of module `name` of the package (a package's `__init__.py`), or None."""
    if name.split(".")[0] != PACKAGE:
        return None
    base = PACKAGE_ROOT.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_source(name: str) -> Path:
    """`module_file(name)`, or an error naming the module when it is no source file of the package."""
    path = module_file(name)
    if path is None:
        raise ValueError(
            f"{name}: expected a module of the {PACKAGE} package, found no source file under {PACKAGE_ROOT}"
        )
    return path


def _imported_names(path: Path, name: str) -> set[str]:
    """Modules of the package that `path` (module `name`) imports, and the packages above them."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    parents = {".".join(n.split(".")[:i]) for n in found for i in range(1, n.count(".") + 1)}
    return {n for n in found | parents if module_file(n) is not None}


@cache
def import_closure(name: str) -> tuple[Path, ...]:
    """Every package source file module `name` needs, itself included, sorted."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo += sorted(_imported_names(_module_source(current), current) - seen)
    return tuple(sorted(_module_source(n) for n in seen))


def code_hashes(name: str) -> dict[str, str]:
    """sha256 (16 hex) of each file of `import_closure(name)` and of the packaged model configs."""
    files = [*import_closure(name), *sorted((PACKAGE_ROOT / "models" / "configs").glob("*.json"))]
    return {
        f.relative_to(PACKAGE_ROOT.parent).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()[:16]
        for f in files
    }
