"""Sources for a user's own data: a CSV list or one folder per label."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from l2rclip.data.sources.base import (
    fold_id,
    make_table,
    read_table,
    reject_list_file,
    require_dir,
    scan_label_folders,
    split_name,
    to_label,
)

CSV_REQUIRED = ("path", "label")
CSV_OPTIONAL = ("group", "fold", "split")


def csv_source(root: Path, list_file: Path | None) -> pd.DataFrame:
    """Read `path,label[,group][,fold][,split]` (default `<root>/labels.csv`; `.tsv` is tab-separated).

    The header names the columns, so their order is free and extra columns are ignored. Paths are
    relative to `root` (or absolute). Blank groups become None. `fold` must be an integer and
    `split` one of train/val(valid, validation)/test on every row, because a half-given protocol
    cannot be followed.

    Raises:
        SourceError: missing root or file, a required column missing (the message names the file,
            the expected and the found columns), a bad fold/split value, or no rows.
    """
    require_dir(root, "csv source root")
    path = list_file if list_file is not None else root / "labels.csv"
    frame = read_table(path, CSV_REQUIRED, CSV_OPTIONAL)
    rows = []
    for index, record in enumerate(frame.to_dict("records")):
        where = f"{path}, data row {index + 1}"
        row = {
            "path": record["path"].strip(),
            "label": to_label(record["label"]),
            "group": record.get("group", "").strip() or None,
        }
        if "fold" in record:
            row["fold"] = fold_id(record["fold"], where)
        if "split" in record:
            row["split"] = split_name(record["split"], where)
        rows.append(row)
    table = make_table(rows, str(path))
    table.attrs["list_file"] = str(path)  # row i is the file's data row i + 1: validation errors name both
    return table


def folder_source(root: Path, list_file: Path | None) -> pd.DataFrame:
    """Read `<root>/<label>/<image>`: the folder name is the label (an integer where it is one).

    Images may sit in subfolders of a label folder; hidden entries are skipped; images directly
    in `root` have no label and are ignored with a warning. `list_file` is not used (a folder
    layout has no list) and is rejected so a mistaken setting does not go unnoticed.
    """
    reject_list_file("folder", list_file)
    return make_table(scan_label_folders(root, to_label), str(root))
