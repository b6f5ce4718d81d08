"""MORPH II (album 2): the published setting lists, or ages parsed from the image file names.

Accepted `list_file` forms:

* a folder of one published setting (`settingA/` .. `settingD/` of the L2RCLIP authors' lists):
  read as published, see `l2rclip.data.sources.morph_settings`.

Other lists (paths inside them are relative to `root`):

* one list file: text lines `<image path><space or tab><age>`; the age is the last field, so
  paths may contain spaces. Blank lines and lines starting with `#` are skipped. If the file's
  name is a split name (`train.txt`, `fold2_test.txt`, see below) its split/fold are recorded.
* a directory of such lists, either one split per file (`train.txt`, `test.txt`, optional
  `val.txt`) or one set per fold (`fold0_train.txt`, `fold0_test.txt`, optional `fold0_val.txt`,
  `fold1_...`; `fold_0_train.txt` and `-` also work; `valid`/`validation` mean `val`). Each
  fold needs a train and a test list.
* no list: every image under `root` with a name like `012345_1M45.JPG` (subject 012345, photo
  1, gender M, age 45); names that do not match keep the file name as label, for validation to
  report.

The group is the subject id from the file name wherever the name has that form, else None.
With fold lists an image appears once per fold that lists it (MORPH setting A draws five random
80/20 splits, so one image is in the test part of some folds and the train part of others).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from l2rclip.data.sources.base import (
    Row,
    SourceError,
    fold_id,
    make_table,
    parse_file_names,
    require_dir,
    require_file,
    split_name,
    to_label,
)
from l2rclip.data.sources.morph_settings import SUBJECT_NAME, find_setting, read_setting, subject_of

log = logging.getLogger(__name__)

_LIST_NAME = re.compile(
    r"(?:fold_?(?P<fold>\d+)[_-])?(?P<split>train|val|valid|validation|test)"
    r"\.(?:txt|lst|list)",
    re.IGNORECASE,
)
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def morph_source(root: Path, list_file: Path | None) -> pd.DataFrame:
    """MORPH II rows: label = age, group = subject id, split/fold from list names (module doc)."""
    require_dir(root, "MORPH root")
    if list_file is None:
        return make_table(parse_file_names(root, root, _parse_name), str(root))
    setting = find_setting(list_file) if list_file.is_dir() else None
    if setting is not None:
        return make_table(read_setting(root, *setting), str(list_file))
    lists: Sequence[tuple[int | None, str | None, Path]]  # (fold, split, path); a single list may name neither
    if list_file.is_dir():
        lists = _split_lists(list_file)
    else:
        require_file(list_file, "MORPH list file")
        match = _LIST_NAME.fullmatch(list_file.name)
        lists = [(_fold_of(match, list_file), _split_of(match, list_file), list_file)]
    rows: list[Row] = []
    for fold, split, path in lists:
        listed = _read_list(path)
        if not listed:
            raise SourceError(f"{path}: expected lines '<image path> <age>', found none")
        extra = {k: v for k, v in (("fold", fold), ("split", split)) if v is not None}
        rows.extend({**row, **extra} for row in listed)
    return make_table(rows, str(list_file))


def _parse_name(name: str) -> Row | None:
    match = SUBJECT_NAME.fullmatch(name)
    return None if match is None else {"label": int(match["label"]), "group": match["group"]}


def _fold_of(match: re.Match[str] | None, path: Path) -> int | None:
    return None if match is None or match["fold"] is None else fold_id(match["fold"], str(path))


def _split_of(match: re.Match[str] | None, path: Path) -> str | None:
    return None if match is None else split_name(match["split"], str(path))


def _split_lists(folder: Path) -> list[tuple[int | None, str, Path]]:
    """Find the split lists in `folder`: (fold, split, path), ordered by fold then train/val/test."""
    found: list[tuple[int | None, str, Path]] = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        match = _LIST_NAME.fullmatch(path.name)
        if match is None:
            log.debug("%s: not a split list name, ignored", path)
            continue
        found.append((_fold_of(match, path), split_name(match["split"], str(path)), path))
    expected = "train.txt + test.txt [+ val.txt], or fold<k>_train.txt + fold<k>_test.txt [+ fold<k>_val.txt]"
    if not found:
        names = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise SourceError(f"{folder}: expected split lists {expected}; found {names}")
    folds = {fold for fold, _, _ in found}
    if None in folds and len(folds) > 1:
        raise SourceError(f"{folder}: mixes plain and per-fold split lists; expected one of {expected}")
    for fold in sorted(folds, key=lambda f: -1 if f is None else f):
        splits = [split for f, split, _ in found if f == fold]
        missing = [s for s in ("train", "test") if s not in splits]
        duplicated = sorted({s for s in splits if splits.count(s) > 1})
        if missing or duplicated:
            label = "" if fold is None else f" fold {fold}"
            raise SourceError(
                f"{folder}:{label} expected one train and one test list (val optional), found {', '.join(splits)}"
            )
    return sorted(found, key=lambda item: (-1 if item[0] is None else item[0], _SPLIT_ORDER[item[1]]))


def _read_list(path: Path) -> list[Row]:
    """Rows of a `<path> <age>` list; a line without an age keeps an empty label for validation."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.rsplit(maxsplit=1)
        image = fields[0]
        label = to_label(fields[1]) if len(fields) == 2 else ""
        rows.append({"path": image, "label": label, "group": subject_of(image)})
    return rows
