"""ChaLearn LAP 2015 apparent age: given train and validation sets with crowd-voted ages."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from l2rclip.data.sources.base import SourceError, make_table, read_table, require_dir, round_half_up

#: (ground-truth file, image folder, split); the test file is optional (released after the challenge).
SETS = (("train_gt.csv", "train", "train"), ("valid_gt.csv", "valid", "val"), ("test_gt.csv", "test", "test"))
GT_COLUMNS = ("image", "mean", "stdv")
_REQUIRED_SPLITS = ("train", "val")


def clap2015_source(root: Path, list_file: Path | None) -> pd.DataFrame:
    """CLAP2015 rows: label = round(mean apparent age), half up; split = train / val (/ test).

    Reads `train_gt.csv` and `valid_gt.csv` (and `test_gt.csv` when present), each with columns
    `image,mean,stdv`, from `list_file` (a directory) or `root`. Images are `train/<image>`,
    `valid/<image>` and `test/<image>` under `root`. No person ids are given: group is None.
    """
    require_dir(root, "CLAP2015 root")
    folder = require_dir(list_file, "CLAP2015 ground-truth directory") if list_file is not None else root
    missing = [str(folder / name) for name, _, split in SETS
               if split in _REQUIRED_SPLITS and not (folder / name).is_file()]
    if missing:
        raise SourceError(f"CLAP2015: expected ground-truth files {', '.join(missing)}")
    rows = []
    for name, images, split in SETS:
        if not (folder / name).is_file():
            continue
        frame = read_table(folder / name, GT_COLUMNS, sep=",")
        rows.extend({"path": f"{images}/{r['image'].strip()}", "label": round_half_up(r["mean"]),
                     "group": None, "split": split} for r in frame.to_dict("records"))
    return make_table(rows, str(folder))
