"""DVC stage `curves`: every fold's learning curve in one file, which dvc.yaml's top-level plots read.

Each train@k writes `outputs/folds/<k>/train/history.csv` (one row per epoch) inside its persist
folder, which cannot be a stage plot (DVC rejects overlapping outputs), and DVC's top-level plot
definitions have no loop: listing one file per fold covered folds 0..4 only, so the protocols with
10 repeats (HCI), 82 folds (FG-NET leave-one-person-out) or folds [0, 1] (MORPH setting B) showed
missing or failing plots. This stage stacks the histories of the folds in `folds` into

    <out>   fold, epoch, phase, <the history's columns>: one row per (fold, epoch), by fold then
            epoch; a column a fold lacks is left empty

and the plots draw one line per fold from it (template `.dvc/plots/fold_curves.json`), for any
number of folds. The histories' values are copied as text, so the file changes only when a
history does.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from l2rclip.config import load_params
from l2rclip.stages.common import run_main, stage_parser

HISTORY = "train/history.csv"


def stack_histories(folds_dir: Path, folds: Sequence[int]) -> pd.DataFrame:
    """The histories of `folds` under `folds_dir/<k>/train/`, stacked with a leading `fold` column.

    Raises:
        FileNotFoundError: a fold of `folds` has no history (its train stage has not run), naming
            every missing file.
    """
    files = {fold: folds_dir / str(fold) / HISTORY for fold in folds}
    if missing := [str(path) for path in files.values() if not path.is_file()]:
        raise FileNotFoundError(
            f"expected a training history for every fold of `folds` {list(folds)}; missing: "
            f"{', '.join(missing)} (run `dvc repro` to train those folds)"
        )
    frames = [
        pd.read_csv(path, dtype=str, keep_default_na=False).assign(fold=str(fold)) for fold, path in files.items()
    ]
    stacked = pd.concat(frames, ignore_index=True).fillna("")
    return stacked[["fold", *[c for c in stacked.columns if c != "fold"]]]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the stage (see `--help`)."""
    parser = stage_parser(
        "curves",
        "Stack the training history of every fold of `folds` into one CSV "
        "(the learning curves dvc.yaml's plots draw).",
    )
    parser.add_argument(
        "--folds-dir",
        type=Path,
        default=Path("outputs/folds"),
        help="folder of the per-fold training outputs (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/curves/learning_curves.csv"),
        help="CSV to write (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    def run() -> int:
        stacked = stack_histories(args.folds_dir, load_params(args.params).folds)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        stacked.to_csv(args.out, index=False, lineterminator="\n")
        return 0

    return run_main(run)


if __name__ == "__main__":
    sys.exit(main())
