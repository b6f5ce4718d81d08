"""Adience: the five given subject-exclusive folds, labelled with the eight age groups.

Two list formats, told apart by the file names in the list folder:

* the dataset's own `fold_<k>_data.txt` (label = the age group's text, e.g. "(25, 32)");
* the L2RCLIP authors' `simplified_adience_<k>.txt`, lines `<user>/landmark_aligned_face.<n>.<id>.jpg
  <group>` with group 0..7 (label = that index, as an int); paths are relative to the `aligned/`
  folder of the release (found by file name under `root` otherwise, see `NameIndex`).

Either way fold = k (the five given subject-exclusive folds) and group = the user (Flickr account).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from l2rclip.data.sources.base import (
    NameIndex,
    Row,
    SourceError,
    make_table,
    read_lines,
    read_table,
    require_dir,
    to_label,
)

#: The eight standard Adience age groups, in rank order (usable as `ranks.labels`).
ADIENCE_GROUPS = ("(0, 2)", "(4, 6)", "(8, 12)", "(15, 20)", "(25, 32)", "(38, 43)", "(48, 53)", "(60, 100)")
N_FOLDS = 5
FOLD_COLUMNS = ("user_id", "original_image", "face_id", "age")
_OPTIONAL = ("gender", "x", "y", "dx", "dy", "tilt_ang", "fiducial_yaw_angle", "fiducial_score")
_PAIR = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)")


def adience_source(root: Path, list_file: Path | None) -> pd.DataFrame:
    """Adience rows: label = age group text, group = user_id, fold = index of the fold file.

    Reads the tab-separated `fold_0_data.txt` .. `fold_4_data.txt` (header `user_id
    original_image face_id age gender ...`) from `list_file` (a directory) or `root`; all five
    must be present since the protocol is five-fold. Images are
    `faces/<user_id>/coarse_tilt_aligned_face.<face_id>.<original_image>` under `root`.

    Only the eight standard groups are ranks. An age written as one of them with other spacing,
    e.g. "(25,32)", is normalised to the standard text; every other age text (`None`, "(38, 42)",
    "35") is kept raw so that validation reports the row as out of range.
    """
    require_dir(root, "Adience root")
    folder = require_dir(list_file, "Adience fold-list directory") if list_file is not None else root
    simplified = [folder / f"simplified_adience_{k}.txt" for k in range(N_FOLDS)]
    if any(f.is_file() for f in simplified):
        return make_table(_simplified(root, simplified), str(folder))
    files = [folder / f"fold_{k}_data.txt" for k in range(N_FOLDS)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SourceError(
            f"Adience: expected the {N_FOLDS} fold files fold_0_data.txt .. "
            f"fold_{N_FOLDS - 1}_data.txt; missing {', '.join(missing)}"
        )
    rows: list[Row] = []
    for fold, path in enumerate(files):
        frame = read_table(path, FOLD_COLUMNS, _OPTIONAL, sep="\t")
        rows.extend(
            {
                "path": f"faces/{r['user_id'].strip()}/coarse_tilt_aligned_face."
                f"{r['face_id'].strip()}.{r['original_image'].strip()}",
                "label": age_group(r["age"]),
                "group": r["user_id"].strip(),
                "fold": fold,
            }
            for r in frame.to_dict("records")
        )
    return make_table(rows, str(folder))


def age_group(text: str) -> str:
    """Return a standard group's canonical text when `text` denotes one, else `text` stripped."""
    match = _PAIR.fullmatch(text.strip())
    if match is not None:
        canonical = f"({int(match[1])}, {int(match[2])})"
        if canonical in ADIENCE_GROUPS:
            return canonical
    return text.strip()


def _simplified(root: Path, files: list[Path]) -> list[dict[str, object]]:
    """Rows of the authors' `simplified_adience_<k>.txt` lists (all five must be present)."""
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SourceError(
            f"Adience: expected the {N_FOLDS} lists simplified_adience_0.txt .. "
            f"simplified_adience_{N_FOLDS - 1}.txt; missing {', '.join(missing)}"
        )
    index = NameIndex(root)
    rows: list[Row] = []
    for fold, path in enumerate(files):
        for line in read_lines(path):
            fields = line.rsplit(maxsplit=1)
            image = fields[0]
            rows.append(
                {
                    "path": index.locate(image),
                    "label": to_label(fields[1]) if len(fields) == 2 else "",
                    "group": image.split("/")[0] if "/" in image else None,
                    "fold": fold,
                }
            )
    return rows
