"""Historical Colour Images (HCI): photos dated by decade, one folder per decade."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from l2rclip.data.sources.base import make_table, reject_list_file, scan_label_folders

_DECADE = re.compile(r"(\d{3}0)s")


def hci_source(root: Path, list_file: Path | None) -> pd.DataFrame:
    """HCI rows from `<root>/1930s/ .. <root>/1970s/`: label = the decade as an int (1930..1970).

    `root` is the folder holding the decade folders (`decade_database` in the original release).
    There is no given split and no group: the 10 random 210/5/50-per-decade repeats of the paper
    are drawn by the splitter. A folder not named like a decade keeps its name as label, so its
    images are reported by validation instead of being dropped unseen.
    """
    reject_list_file("hci", list_file)
    return make_table(scan_label_folders(root, decade), str(root))


def decade(name: str) -> Any:
    """"1950s" -> 1950; any other folder name is returned unchanged."""
    match = _DECADE.fullmatch(name.strip())
    return int(match[1]) if match else name
