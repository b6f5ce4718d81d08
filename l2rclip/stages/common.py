"""What the DVC stage entry points share: seeding, the device, the prepared data, run identity."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from l2rclip.data.splits import read_splits
from l2rclip.locking import OutputLockedError

log = logging.getLogger(__name__)


def read_prepared(prepared: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The prepare stage's `images.csv` and `splits.csv`, with a clear error when missing."""
    files = [prepared / "images.csv", prepared / "splits.csv"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"expected the prepare stage's outputs, missing: {', '.join(missing)}; "
            "run `dvc repro prepare` (or `l2rclip prepare`) first"
        )
    return pd.read_csv(files[0], keep_default_na=False), read_splits(files[1])


def write_json(path: Path, data: Any) -> None:
    """Stable JSON (sorted keys, fixed float format via json), newline-terminated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n", encoding="utf-8")


def stage_parser(module: str, description: str, per_fold: bool = False) -> argparse.ArgumentParser:
    """The parser of `python -m l2rclip.stages.<module>`: `--params`; per fold the fold's inputs.

    Per fold: `--fold`, `--prepared` and `--store` (the preprocess stage's image store; without it
    the stage decodes the image files).
    """
    parser = argparse.ArgumentParser(prog=f"python -m l2rclip.stages.{module}", description=description)
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)"
    )
    if per_fold:
        parser.add_argument("--fold", type=int, required=True, help="fold number (a fold of splits.csv)")
        parser.add_argument(
            "--prepared",
            type=Path,
            default=Path("outputs/prepare"),
            help="the prepare stage's output folder (default: %(default)s)",
        )
        parser.add_argument(
            "--store",
            type=Path,
            default=None,
            help="the preprocess stage's image store, e.g. outputs/preprocess as dvc.yaml "
            "passes it (default: none, decode the image files)",
        )
    return parser


def run_main(entry: Callable[[], int | dict[str, Any]]) -> int:
    """Run a stage's main with the project's logging; known errors become one line and exit 2.

    `entry` returns an exit status, or the summary of what the stage wrote (it finished: exit 0,
    even for an empty summary, which `sys.exit` would print and turn into exit 1).
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("l2rclip").setLevel(logging.INFO)
    try:
        status = entry()
    except (ValueError, FileNotFoundError, OutputLockedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0
