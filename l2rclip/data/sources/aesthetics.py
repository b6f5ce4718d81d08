"""Flickr image aesthetics (Schifanella et al.): four categories, five aesthetic grades.

The L2RCLIP authors' CrowdBeauty lists: `list_file` is a folder of `<category>_train.txt` and
`<category>_test.txt` (and `<category>_datasets.txt`, all of it, not needed), headerless lines
`<id>.png<TAB><score>` with scores 1.0..5.0. Rows carry the given `split` (train / test; the
splitter carves validation from train) and a `category` column; label = the score rounded half
up (the five levels 1..5); group None (no person ids). Paths are relative to `root`, or found by
file name under it (`NameIndex`). The `category` option (`data.category`) keeps one category,
as the paper reports each category on its own; null keeps all four.

Other accepted lists: `list_file` (default `<root>/labels.csv`) is one CSV/TSV (`.tsv`/`.txt` are
tab-separated, others comma-separated) or a directory of them, e.g. one list per category
(`animals.csv`, `urban.csv`, ...; read in name order). Columns, matched by name:

* image: `path`, `image`, `image_id` or `id`; relative to `root`. A value without a file
  extension is an id and gets `.jpg` appended.
* category: `category`; when absent, the list file's name without extension is the category.
* grade: per-rater columns `rater1`, `rater_2`, `score_3`, `grade4`, ... (blank cells allowed,
  for images with fewer raters), or one summary column `median`, `score` or `mean`. With rater
  columns the label is their median, as in the dataset's ground truth; otherwise the summary.

The label is the grade rounded half up (an int, 1..5 on valid data); grades that are not numbers
are kept as text for validation to report. The group is the category: the paper's protocol is a
per-category 80/20 split, so the splitter stratifies on it (it is not a person id).
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from l2rclip.data.sources.base import (
    NameIndex,
    SourceError,
    make_table,
    pick_column,
    read_lines,
    read_table,
    require_dir,
    round_half_up,
)

IMAGE_COLUMNS = ("path", "image", "image_id", "id")
SUMMARY_COLUMNS = ("median", "score", "mean")
_RATER = re.compile(r"(rater|score|grade)_?\d+", re.IGNORECASE)
_LIST_SUFFIXES = {".csv", ".tsv", ".txt"}
_GIVEN_LIST = re.compile(r"(?P<category>[a-z]+)_(?P<split>train|test)\.txt")


def aesthetics_source(root: Path, list_file: Path | None, category: str | None = None) -> pd.DataFrame:
    """Aesthetics rows: label = rounded grade (formats in the module doc).

    Args:
        root: the image root.
        list_file: a list file or folder (default `<root>/labels.csv`).
        category: keep only this category (null: all).
    """
    require_dir(root, "aesthetics root")
    target = list_file if list_file is not None else root / "labels.csv"
    given = _given_lists(target) if target.is_dir() else {}
    if given:
        return make_table(_read_given(root, given, category), str(target))
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.is_file() and p.suffix.lower() in _LIST_SUFFIXES)
        if not files:
            suffixes = ", ".join(sorted(_LIST_SUFFIXES))
            raise SourceError(f"{target}: expected list files ({suffixes}), found none")
    else:
        files = [target]
    rows = [row for path in files for row in _read_list(path)]
    return make_table(_keep_category(rows, category, "group", target), str(target))


def _given_lists(folder: Path) -> dict[str, dict[str, Path]]:
    """{category: {"train": path, "test": path}} of the CrowdBeauty lists in `folder`."""
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = _GIVEN_LIST.fullmatch(path.name)
        if match is not None and path.is_file():
            found.setdefault(match["category"], {})[match["split"]] = path
    incomplete = sorted(c for c, lists in found.items() if set(lists) != {"train", "test"})
    if incomplete:
        raise SourceError(
            f"{folder}: expected <category>_train.txt and <category>_test.txt for every "
            f"category; incomplete: {', '.join(incomplete)}"
        )
    return found


def _read_given(root: Path, given: dict[str, dict[str, Path]], category: str | None) -> list[dict[str, Any]]:
    index = NameIndex(root)
    rows = []
    for name, lists in sorted(given.items()):
        for split in ("train", "test"):
            for line in read_lines(lists[split]):
                fields = line.rsplit(maxsplit=1)
                rows.append(
                    {
                        "path": index.locate(fields[0]),
                        "label": round_half_up(fields[1]) if len(fields) == 2 else "",
                        "group": None,
                        "split": split,
                        "category": name,
                    }
                )
    return _keep_category(rows, category, "category", lists["train"].parent)


def _keep_category(
    rows: list[dict[str, Any]], category: str | None, column: str, where: Path
) -> list[dict[str, Any]]:
    """The rows of one category (all when `category` is None); an unknown one is an error."""
    if category is None:
        return rows
    kept = [row for row in rows if row[column] == category]
    if not kept:
        found = ", ".join(sorted({str(row[column]) for row in rows}))
        raise SourceError(f"{where}: data.category {category!r} not found; categories found: {found}")
    return kept


def _read_list(path: Path) -> list[dict[str, Any]]:
    frame = read_table(path, required=())
    image = pick_column(frame, path, IMAGE_COLUMNS, "image")
    raters = [c for c in frame.columns if _RATER.fullmatch(c)]
    summary = None if raters else pick_column(frame, path, SUMMARY_COLUMNS, "grade (or per-rater grades)")
    category = pick_column(frame, path, ("category",), "category", required=False)
    rows = []
    for record in frame.to_dict("records"):
        name = record[image].strip()
        grade = _grade([record[c] for c in raters]) if raters else round_half_up(record[summary])
        rows.append(
            {
                "path": name if Path(name).suffix else f"{name}.jpg",
                "label": grade,
                "group": record[category].strip() if category else path.stem,
            }
        )
    return rows


def _grade(scores: list[str]) -> Any:
    """Median of the non-blank rater grades, rounded half up; the raw text if any is not a number."""
    given = [s.strip() for s in scores if s.strip()]
    try:
        return round_half_up(statistics.median(float(s) for s in given))
    except (ValueError, statistics.StatisticsError):
        return ",".join(given)
