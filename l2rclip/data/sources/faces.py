"""FG-NET and UTKFace: a `labels.csv` beside the images, or labels parsed from the file names.

Both are laid out as in ../shared/data: `<root>/labels.csv` and the images in `<root>/images/`
(or directly in `<root>` when there is no `images/` folder). The CSV wins when present because it
is the curated record; the file names are the fallback for a bare download.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from l2rclip.data.sources.base import (
    Row,
    image_folder,
    make_table,
    parse_file_names,
    read_table,
    relative,
    require_dir,
    to_label,
)

_FGNET_NAME = re.compile(r"(?P<group>\d+)A(?P<label>\d+)[a-z]?\.jpe?g", re.IGNORECASE)
_UTKFACE_NAME = re.compile(r"(?P<label>\d+)_.*\.(jpe?g|png)", re.IGNORECASE)


def fgnet_source(root: Path, list_file: Path | None) -> pd.DataFrame:
    """FG-NET: 1002 photos of 82 people; label = age in years, group = subject id ("001").

    Reads `filename,subject_id,age` from `list_file` or `<root>/labels.csv`; without either, parses
    names like `001A02.JPG` / `001A22a.JPG` (subject 001 at age 2 / 22; a trailing letter marks a
    second photo at that age). Rows follow the CSV's order, or sorted file names.
    """
    return _labels_or_names(root, list_file, "FG-NET", ("filename", "age", "subject_id"), _matcher(_FGNET_NAME))


def utkface_source(root: Path, list_file: Path | None) -> pd.DataFrame:
    """UTKFace: label = age in years; no subject ids, so group is None.

    Reads `filename,age[,gender,race]` from `list_file` or `<root>/labels.csv`; without either,
    takes the age from names `[age]_[gender]_[race]_[datetime].jpg.chip.jpg`. Only the leading age
    is needed, so the few published names that lack the race field still parse.
    """
    return _labels_or_names(root, list_file, "UTKFace", ("filename", "age", None), _matcher(_UTKFACE_NAME))


def _matcher(pattern: re.Pattern[str]) -> Callable[[str], Row | None]:
    """File name -> {"label": int, "group": str | None} via the pattern's named groups."""

    def parse(name: str) -> Row | None:
        match = pattern.fullmatch(name)
        if match is None:
            return None
        found = match.groupdict()
        return {"label": int(found["label"]), "group": found.get("group")}

    return parse


def _labels_or_names(
    root: Path,
    list_file: Path | None,
    dataset: str,
    columns: tuple[str, str, str | None],
    parse: Callable[[str], Row | None],
) -> pd.DataFrame:
    """Rows from the labels CSV when there is one, else from the image file names.

    Args:
        root: the dataset folder (paths are relative to it).
        list_file: the labels CSV, overriding `<root>/labels.csv`.
        dataset: the dataset's name, for error messages.
        columns: the CSV's (file name, label, group or None) columns.
        parse: file name -> {"label", "group"}, or None when the name does not match.
    """
    require_dir(root, f"{dataset} root")
    folder = image_folder(root)
    labels = list_file if list_file is not None else root / "labels.csv"
    if list_file is None and not labels.is_file():
        return make_table(parse_file_names(root, folder, parse), str(folder))
    file_column, label_column, group_column = columns
    required = [c for c in columns if c is not None]
    frame = read_table(labels, required)
    rows = [
        {
            "path": relative(folder / record[file_column].strip(), root),
            "label": to_label(record[label_column]),
            "group": record[group_column].strip() if group_column else None,
        }
        for record in frame.to_dict("records")
    ]
    return make_table(rows, str(labels))
