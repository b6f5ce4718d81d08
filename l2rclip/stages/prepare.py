"""DVC stage `prepare`: source -> validated images -> folds, written as plain files.

Outputs (in `out_dir`), byte-identical for the same params and data (sorted rows, fixed float
format, no timestamps), so DVC sees no change when nothing changed:
    images.csv     good rows: row (in the source table), path, label, group, [fold, split as
                   given], [race, gender, category, stdv where the source has them], rank,
                   value, width, height, mode; sorted by path then row.
    bad_rows.csv   row, path, label, reason, detail; written (header only) when nothing is bad.
    splits.csv     fold, split, path, group, label, rank, value [, the extra columns]: a row
                   per (image, fold).
    holdout.csv    path, group, label, rank, value: the promotion holdout (`split.holdout_fraction`,
                   l2rclip.data.holdout), in no fold; header only when the fraction is 0.
    summary.json   counts: rows, bad rows by reason, images per rank, split sizes per fold.
The source data is only read; for the demo source that includes `data/demo`, which only the
`demo` stage writes (a folder holding other demo settings is refused, see l2rclip.data.sources.demo).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from l2rclip.config import ConfigError, Params, load_params
from l2rclip.data.formats import DATA_FORMATS, PREPARE_DESCRIPTION
from l2rclip.data.holdout import HOLDOUT_COLUMNS, holdout_spec, holdout_version, split_holdout
from l2rclip.data.sources import SourceError, load_source
from l2rclip.data.splits import FOLD_SPLITS, SplitError, make_splits
from l2rclip.data.validate import DataValidationError, ranks_hint, validate_table
from l2rclip.ranks import RankError, RankSpace

log = logging.getLogger(__name__)

FLOAT_FORMAT = "%.10g"


def prepare(params: Params, out_dir: str | Path) -> dict[str, Any]:
    """Load the source named in `params.data`, validate every row, split, and write the outputs.

    Args:
        params: the whole configuration (uses `seed`, `ranks`, `data`, `split`).
        out_dir: folder for the five output files; created when missing.

    Returns:
        The summary that is also written to `summary.json`.

    Raises:
        SourceError: the source cannot be read.
        DataValidationError: a structural problem, no good row at all, or the first bad row
            when `data.on_bad` is `fail`.
        SplitError: the split settings cannot be met by the good rows.
    """
    random.seed(params.seed)
    np.random.seed(params.seed)
    rank_space = RankSpace.from_config(params.ranks)
    table = _load(params)
    good, report = validate_table(
        table,
        params.data.root,
        rank_space,
        on_bad=params.data.on_bad,
        allow_outside_root=params.data.allow_outside_root,
        duplicates=params.data.duplicates,
        workers=params.data.decode_workers,
        max_pixels=params.data.max_image_pixels,
    )
    outside = _outside_ranks_note(table, report, rank_space)
    if good.empty:
        raise DataValidationError(
            f"none of the {len(table)} rows of source {params.data.source!r} "
            f"at {table.attrs.get('list_file', params.data.root)} is usable "
            f"(see the reasons above){outside}"
        )
    # Sorting by path makes the folds independent of the order in which a source lists files.
    good = good.sort_values(["path", "row"], kind="mergesort").reset_index(drop=True)
    folded, holdout = split_holdout(good, params.split.holdout_fraction, params.split.holdout_salt)
    if folded.empty:
        raise SplitError(
            f"split.holdout_fraction {params.split.holdout_fraction} leaves no image for the folds "
            f"({len(good)} good images, all in the holdout); lower it"
        )
    try:
        splits = make_splits(folded, params.split, params.seed, rank_space)
    except SplitError as error:  # too few images left may only be the symptom of ranks that do not fit
        raise SplitError(f"{error}{outside}") from None
    holdout = holdout[[c for c in HOLDOUT_COLUMNS if c in holdout.columns]]
    summary = _summary(params, table, good, report, splits, rank_space)
    summary["holdout"] = {
        "images": len(holdout),
        "spec": holdout_spec(params.split.holdout_fraction, params.split.holdout_salt),
        "version": holdout_version(holdout),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(good, out_dir / "images.csv")
    _write_csv(report, out_dir / "bad_rows.csv")
    _write_csv(splits, out_dir / "splits.csv")
    _write_csv(holdout, out_dir / "holdout.csv")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info(
        "prepare: %d good and %d bad rows, %d folds, %d images in the promotion holdout, written to %s",
        len(good),
        len(report),
        len(summary["folds"]),
        len(holdout),
        out_dir,
    )
    return summary


def _outside_ranks_note(table: pd.DataFrame, report: pd.DataFrame, rank_space: RankSpace) -> str:
    """'; N of M rows have labels outside the ranks ...: <what to set>', or '' when every label is a rank."""
    outside = int((report["reason"] == "label_not_in_ranks").sum())
    if not outside:
        return ""
    return (
        f"; {outside} of {len(table)} rows have labels outside the ranks {rank_space.describe()}: "
        f"{ranks_hint(table['label'])}"
    )


def _load(params: Params) -> pd.DataFrame:
    """Read the source table; the generated demo set and the aesthetics lists take options."""
    data = params.data
    options: dict[str, Any] = {}
    if data.source == "demo":
        options = {"n_per_rank": data.demo.n_per_rank, "image_size": data.demo.image_size, "seed": params.seed}
    if data.category is not None:
        if data.source != "aesthetics":
            raise SourceError(
                f"data.category ({data.category!r}) selects an aesthetics category; "
                f"source {data.source!r} has none (set data.category: null)"
            )
        options["category"] = data.category
    return load_source(data.source, data.root, data.list_file, **options)


def _summary(
    params: Params,
    table: pd.DataFrame,
    good: pd.DataFrame,
    report: pd.DataFrame,
    splits: pd.DataFrame,
    rank_space: RankSpace,
) -> dict[str, Any]:
    """Collect the counts a reader checks first: what was dropped and why, and split sizes."""
    per_rank = good["rank"].value_counts()
    sizes = splits.groupby(["fold", "split"]).size()
    folds = []
    for fold in sorted(splits["fold"].unique().tolist()):
        trained = set(splits.loc[(splits["fold"] == fold) & (splits["split"] == "train"), "rank"])
        folds.append(
            {
                "fold": int(fold),
                **{s: int(sizes.get((fold, s), 0)) for s in FOLD_SPLITS},
                "missing_train_ranks": [
                    rank_space.label_of(r) for r in range(len(rank_space)) if r not in trained
                ],
            }
        )
    return {
        "source": params.data.source,
        "root": params.data.root,
        "protocol": params.split.protocol,
        "rows": {"total": len(table), "good": len(good), "bad": len(report)},
        "bad_by_reason": {str(k): int(v) for k, v in report["reason"].value_counts().items()},
        "ranks": [
            {
                "rank": r,
                "label": rank_space.label_of(r),
                "value": rank_space.values[r],
                "images": int(per_rank.get(r, 0)),
            }
            for r in range(len(rank_space))
        ],
        "folds": folds,
    }


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write a table with fixed float format and line endings, so reruns are byte-identical."""
    frame.to_csv(path, index=False, float_format=FLOAT_FORMAT, lineterminator="\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `python -m l2rclip.stages.prepare --params params.yaml --out outputs/prepare`."""
    parser = argparse.ArgumentParser(
        prog="python -m l2rclip.stages.prepare",
        description=PREPARE_DESCRIPTION,
        epilog=DATA_FORMATS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/prepare"),
        help="output folder, created when missing (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        prepare(load_params(args.params), args.out)
    except (ConfigError, RankError, SourceError, DataValidationError, SplitError) as error:
        parser.exit(2, f"prepare: error: {error}\n")
    except OSError as error:  # e.g. --out on a read-only copy: one line that names the file, not a traceback
        parser.exit(2, f"prepare: error: cannot write the outputs to {args.out}: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
