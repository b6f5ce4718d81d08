"""The installation's own programs first on PATH, so that nothing needs an activated `.venv`.

`.venv/bin/l2rclip demo` runs `.venv/bin/dvc`, but DVC runs each stage's `python -m l2rclip...`
and `mlflow models serve` runs `uvicorn` by name: without an activated `.venv` those names would
find another Python (without l2rclip) or nothing ("uvicorn: not found"). Commands that start such
tools give them this environment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path


def interpreter_first_on_path(environ: Mapping[str, str], executable: str = sys.executable) -> dict[str, str]:
    """A copy of `environ` whose PATH starts with the folder of `executable` (once; the rest kept in order)."""
    bin_dir = str(Path(executable).parent)  # not resolved: a venv's python is a link out of the venv
    rest = [entry for entry in environ.get("PATH", "").split(os.pathsep) if entry and entry != bin_dir]
    return {**environ, "PATH": os.pathsep.join([bin_dir, *rest])}
