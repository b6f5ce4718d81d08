"""MORPH II settings A-D as published in the L2RCLIP authors' `datalist/morph/` folders.

`data.list_file` names one setting's folder; the setting is recognised from the file names, and
the files are read exactly as published:

* **A** `Setting_A_fold<k>_{train,test}.txt`: five random 80/20 splits of 5,492 images each
  (as published the five folds do not draw from one subset: 5,942 distinct images in all).
  Fold 0 is space-separated with the header `race gender age filename database`; folds 1-4 are
  comma-separated with a leading unnamed index column (`,race,gender,age,filename,database`).
  Rows carry `fold` and `split`; an image is listed once per fold.
* **B** `Setting_B_fold<k>.txt` (same space-separated header): three disjoint subsets S1, S2, S3
  of 7,000 images (balanced black/white, female:male about 1:3). *Our reading of the published
  protocol* (Guo & Mu, CVPR 2011; Pan et al., "Mean-Variance Loss", CVPR 2018, and the age
  papers that follow them): train on one subset and test on the union of the other two; the
  literature reports the mean of "train S1, test S2+S3" and "train S2, test S1+S3". So fold k
  trains on subset k and tests on the other two: each image is listed in all three folds (once
  as train, twice as test). The `morph-b` preset runs folds 0 and 1 (the published pair); fold 2
  (train S3) is there for completeness. The subsets are image-disjoint but not subject-disjoint
  (about 2,200 subjects appear in two subsets), as published.
* **C** `morph_C_<k>.txt` and **D** `morph_D_<k>.txt`: `<path> <age>` lines whose paths point
  into the authors' tree (`../../datasets/Morph/image/<name>.JPG`). C: five random folds of the
  full 55,134 images; D: five subject-exclusive folds (as published nearly so: 180 of the 13,617
  subject ids in the file names span two folds, against 12,365 in C; kept as given). File k is
  fold k's test set, the other four its training set (rows carry `fold`; protocol `given`).

Image paths are resolved by file name under `data.root` (`NameIndex`), so any copy of the
images works whatever its folder layout. `race` and `gender` (A, B) are kept as columns with the
list's codes: note that A codes `gender` 1 for male and B codes it 0 for male (read from the
file names, which carry M/F). Label = age; group = the subject id from the file name.
"""

from __future__ import annotations

import re
from pathlib import Path

from l2rclip.data.sources.base import (
    NameIndex,
    Row,
    SourceError,
    fold_id,
    read_lines,
    read_table,
    require_file,
    to_label,
)

SUBJECT_NAME = re.compile(r"(?P<group>\d+)_\d+[MF](?P<label>\d+)\.(jpe?g|png)", re.IGNORECASE)
_PATTERNS = {
    "A": re.compile(r"Setting_A_fold(?P<fold>\d+)_(?P<split>train|test)\.txt"),
    "B": re.compile(r"Setting_B_fold(?P<fold>\d+)\.txt"),
    "C": re.compile(r"morph_C_(?P<fold>\d+)\.txt"),
    "D": re.compile(r"morph_D_(?P<fold>\d+)\.txt"),
}
HEADER_COLUMNS = ("age", "filename")
_OPTIONAL = ("race", "gender", "database")


def subject_of(name: str) -> str | None:
    """Subject id of a MORPH file name like `012345_1M45.JPG`, or None for other names."""
    match = SUBJECT_NAME.fullmatch(Path(name).name)
    return None if match is None else match["group"]


def find_setting(folder: Path) -> tuple[str, list[tuple[re.Match[str], Path]]] | None:
    """The published setting whose lists `folder` holds, with the matching files; None if none.

    Raises:
        SourceError: the folder mixes the files of two settings.
    """
    found: dict[str, list[tuple[re.Match[str], Path]]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        for setting, pattern in _PATTERNS.items():
            match = pattern.fullmatch(path.name)
            if match is not None:
                found.setdefault(setting, []).append((match, path))
    if len(found) > 1:
        raise SourceError(
            f"{folder}: expected the lists of one MORPH setting, found settings "
            f"{', '.join(sorted(found))}; point data.list_file at one setting's folder"
        )
    return next(iter(found.items()), None)


def read_setting(root: Path, setting: str, files: list[tuple[re.Match[str], Path]]) -> list[Row]:
    """Rows of one published setting (module doc), image paths resolved under `root`."""
    index = NameIndex(root)
    if setting == "A":
        return _setting_a(index, files)
    if setting == "B":
        return _setting_b(index, files)
    rows: list[Row] = []
    for match, path in files:
        fold = fold_id(match["fold"], str(path))
        rows.extend({**row, "fold": fold} for row in _path_age_list(index, path))
    return rows


def _setting_a(index: NameIndex, files: list[tuple[re.Match[str], Path]]) -> list[Row]:
    by_fold: dict[int, dict[str, Path]] = {}
    for match, path in files:
        by_fold.setdefault(fold_id(match["fold"], str(path)), {})[match["split"]] = path
    rows: list[Row] = []
    for fold, lists in sorted(by_fold.items()):
        if set(lists) != {"train", "test"}:
            raise SourceError(
                f"MORPH setting A fold {fold}: expected Setting_A_fold{fold}_train.txt and "
                f"Setting_A_fold{fold}_test.txt, found {', '.join(p.name for p in lists.values())}"
            )
        for split in ("train", "test"):
            rows.extend({**row, "fold": fold, "split": split} for row in _header_list(index, lists[split]))
    return rows


def _setting_b(index: NameIndex, files: list[tuple[re.Match[str], Path]]) -> list[Row]:
    subsets = sorted((fold_id(match["fold"], str(path)), path) for match, path in files)
    if len(subsets) < 2:
        raise SourceError(
            f"MORPH setting B: expected the subset lists Setting_B_fold0.txt .. "
            f"Setting_B_fold2.txt, found {', '.join(p.name for _, p in subsets)}"
        )
    listed = [(number, _header_list(index, path)) for number, path in subsets]
    return [
        {**row, "fold": fold, "split": "train" if number == fold else "test"}
        for fold, _ in subsets
        for number, rows in listed
        for row in rows
    ]


def _header_list(index: NameIndex, path: Path) -> list[Row]:
    """A settings A/B table: space- or comma-separated (told by the header), unnamed columns ignored."""
    with require_file(path, "MORPH list").open(encoding="utf-8-sig") as handle:
        header = handle.readline()
    frame = read_table(path, HEADER_COLUMNS, _OPTIONAL, sep="," if "," in header else r"\s+")
    frame = frame.fillna("")  # a short row: blank cells, reported by validation
    extras = [c for c in ("race", "gender") if c in frame.columns]
    return [
        {
            "path": index.locate(record["filename"]),
            "label": to_label(record["age"]),
            "group": subject_of(record["filename"].strip()),
            **{c: to_label(record[c]) for c in extras},
        }
        for record in frame.to_dict("records")
    ]


def _path_age_list(index: NameIndex, path: Path) -> list[Row]:
    """A settings C/D list of `<path> <age>` lines; a line without an age keeps an empty label."""
    rows: list[Row] = []
    for line in read_lines(path):
        fields = line.rsplit(maxsplit=1)
        label = to_label(fields[1]) if len(fields) == 2 else ""
        rows.append({"path": index.locate(fields[0]), "label": label, "group": subject_of(fields[0])})
    if not rows:
        raise SourceError(f"{path}: expected lines '<image path> <age>', found none")
    return rows
