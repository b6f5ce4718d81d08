"""ChaLearn LAP 2015 apparent age: given train and validation sets with crowd-voted ages.

Two list formats:

* the L2RCLIP authors' `total_2015.csv` (`list_file` = that file, or a folder holding it), header
  `filename,age,stdv,database`, database = train / val / test: split from `database`; images found
  by file name under `root` (the release keeps them in `train/`, `valid/`, `test/`; see `NameIndex`);
* the challenge's own `train_gt.csv`, `valid_gt.csv` (and `test_gt.csv`), see `clap2015_source`.

Both keep `stdv` (the std of the human guesses) as a column: the challenge's epsilon error
`1 - exp(-(pred - mean)^2 / (2 stdv^2))` needs it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from l2rclip.data.sources.base import (
    NameIndex,
    Row,
    SourceError,
    make_table,
    read_table,
    require_dir,
    round_half_up,
    split_name,
)

#: (ground-truth file, image folder, split); the test file is optional (released after the challenge).
SETS = (("train_gt.csv", "train", "train"), ("valid_gt.csv", "valid", "val"), ("test_gt.csv", "test", "test"))
GT_COLUMNS = ("image", "mean", "stdv")
_REQUIRED_SPLITS = ("train", "val")
TOTAL_LIST = "total_2015.csv"
TOTAL_COLUMNS = ("filename", "age", "stdv", "database")


def clap2015_source(root: Path, list_file: Path | None) -> pd.DataFrame:
    """CLAP2015 rows: label = round(mean apparent age), half up; split = train / val (/ test).

    Reads `train_gt.csv` and `valid_gt.csv` (and `test_gt.csv` when present), each with columns
    `image,mean,stdv`, from `list_file` (a directory) or `root`. Images are `train/<image>`,
    `valid/<image>` and `test/<image>` under `root`. No person ids are given: group is None.
    """
    require_dir(root, "CLAP2015 root")
    if list_file is not None and (list_file.is_file() or (list_file / TOTAL_LIST).is_file()):
        return _total_list(root, list_file if list_file.is_file() else list_file / TOTAL_LIST)
    folder = require_dir(list_file, "CLAP2015 ground-truth directory") if list_file is not None else root
    missing = [
        str(folder / name)
        for name, _, split in SETS
        if split in _REQUIRED_SPLITS and not (folder / name).is_file()
    ]
    if missing:
        raise SourceError(f"CLAP2015: expected ground-truth files {', '.join(missing)}")
    rows: list[Row] = []
    for name, images, split in SETS:
        if not (folder / name).is_file():
            continue
        frame = read_table(folder / name, GT_COLUMNS, sep=",")
        rows.extend(
            {
                "path": f"{images}/{r['image'].strip()}",
                "label": round_half_up(r["mean"]),
                "group": None,
                "split": split,
                "stdv": _number(r["stdv"]),
            }
            for r in frame.to_dict("records")
        )
    return make_table(rows, str(folder))


def _total_list(root: Path, path: Path) -> pd.DataFrame:
    """Rows of the authors' `total_2015.csv` (module doc)."""
    frame = read_table(path, TOTAL_COLUMNS, sep=",")
    index = NameIndex(root)
    rows = [
        {
            "path": index.locate(r["filename"]),
            "label": round_half_up(r["age"]),
            "group": None,
            "split": split_name(r["database"], f"{path}, data row {i + 1}"),
            "stdv": _number(r["stdv"]),
        }
        for i, r in enumerate(frame.to_dict("records"))
    ]
    return make_table(rows, str(path))


def _number(text: str) -> float:
    """A float, or NaN for a blank or non-numeric cell (the row itself stays usable)."""
    try:
        return float(text)
    except ValueError:
        return float("nan")
