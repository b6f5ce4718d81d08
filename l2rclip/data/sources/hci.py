"""Historical Colour Images (HCI): photos dated by decade, 1930s..1970s (265 images each).

Three layouts, label = the decade as an int (1930..1970):

* `list_file` = the L2RCLIP authors' per-decade lists (a folder of `1930s.txt` .. `1970s.txt`, or
  one of them): lines `./images/1930s_decade_<md5>.jpg 1930s`, paths relative to `root` (found by
  file name under `root` otherwise, see `NameIndex`);
* no list, decade folders `<root>/1930s/ .. <root>/1970s/` (`decade_database` of the release);
* no list, one flat folder (`<root>/images/` or `<root>`) of files named `<decade>s_decade_*.jpg`:
  the decade comes from the file-name prefix.

There is no given split and no group: the 10 random 210/5/50-per-decade repeats of the paper
are drawn by the splitter (`split.protocol: repeats`). A folder, list label or file name that
is not a decade is kept as label, so validation reports it instead of it vanishing unseen.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from l2rclip.data.sources.base import (
    NameIndex,
    Row,
    SourceError,
    image_folder,
    make_table,
    parse_file_names,
    read_lines,
    require_dir,
    scan_label_folders,
)

_DECADE = re.compile(r"(\d{3}0)s")
_DECADE_PREFIX = re.compile(r"(\d{3}0)s_")
_LIST_NAME = re.compile(r"\d{3}0s\.txt")


def hci_source(root: Path, list_file: Path | None) -> pd.DataFrame:
    """HCI rows from the lists, the decade folders or the flat folder (module doc)."""
    require_dir(root, "HCI root")
    if list_file is not None:
        return make_table(_read_lists(root, list_file), str(list_file))
    if any(p.is_dir() and _DECADE.fullmatch(p.name) for p in root.iterdir()):
        return make_table(scan_label_folders(root, decade), str(root))
    folder = image_folder(root)
    return make_table(parse_file_names(root, folder, _from_prefix), str(folder))


def decade(name: str) -> Any:
    """Decade label to its year: "1950s" -> 1950; any other text is returned unchanged."""
    match = _DECADE.fullmatch(name.strip())
    return int(match[1]) if match else name.strip()


def _from_prefix(name: str) -> Row | None:
    match = _DECADE_PREFIX.match(name)
    return None if match is None else {"label": int(match[1]), "group": None}


def _read_lists(root: Path, list_file: Path) -> list[Row]:
    if list_file.is_dir():
        files = sorted(p for p in list_file.iterdir() if p.is_file() and _LIST_NAME.fullmatch(p.name))
        if not files:
            names = ", ".join(sorted(p.name for p in list_file.iterdir())) or "nothing"
            raise SourceError(f"{list_file}: expected per-decade lists 1930s.txt .. 1970s.txt, found {names}")
    else:
        files = [list_file]
    index = NameIndex(root)
    rows = []
    for path in files:
        for line in read_lines(path):
            fields = line.rsplit(maxsplit=1)
            rows.append(
                {
                    "path": index.locate(fields[0]),
                    "label": decade(fields[1]) if len(fields) == 2 else "",
                    "group": None,
                }
            )
    return rows
