"""Flickr image aesthetics (Schifanella et al.): four categories, five aesthetic grades.

Accepted lists: `list_file` (default `<root>/labels.csv`) is one CSV/TSV (`.tsv`/`.txt` are
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
    SourceError,
    make_table,
    pick_column,
    read_table,
    require_dir,
    round_half_up,
)

IMAGE_COLUMNS = ("path", "image", "image_id", "id")
SUMMARY_COLUMNS = ("median", "score", "mean")
_RATER = re.compile(r"(rater|score|grade)_?\d+", re.IGNORECASE)
_LIST_SUFFIXES = {".csv", ".tsv", ".txt"}


def aesthetics_source(root: Path, list_file: Path | None) -> pd.DataFrame:
    """Aesthetics rows: label = rounded grade, group = category (formats in the module doc)."""
    require_dir(root, "aesthetics root")
    target = list_file if list_file is not None else root / "labels.csv"
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.is_file() and p.suffix.lower() in _LIST_SUFFIXES)
        if not files:
            suffixes = ", ".join(sorted(_LIST_SUFFIXES))
            raise SourceError(f"{target}: expected list files ({suffixes}), found none")
    else:
        files = [target]
    return make_table([row for path in files for row in _read_list(path)], str(target))


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
        rows.append({"path": name if Path(name).suffix else f"{name}.jpg", "label": grade,
                     "group": record[category].strip() if category else path.stem})
    return rows


def _grade(scores: list[str]) -> Any:
    """Median of the non-blank rater grades, rounded half up; the raw text if any is not a number."""
    given = [s.strip() for s in scores if s.strip()]
    try:
        return round_half_up(statistics.median(float(s) for s in given))
    except (ValueError, statistics.StatisticsError):
        return ",".join(given)
