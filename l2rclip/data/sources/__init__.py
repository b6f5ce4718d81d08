"""Dataset adapters ("sources"), each turning one on-disk layout into the common table.

`load_source(name, root, list_file, **options)` is the entry point; `SOURCES` maps the names
accepted in params.yaml (`data.source`) to adapters `(root, list_file, **options) -> DataFrame`.
The table's columns and the error policy are described in `l2rclip.data.sources.base`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from l2rclip.data.sources.adience import ADIENCE_GROUPS, adience_source
from l2rclip.data.sources.aesthetics import aesthetics_source
from l2rclip.data.sources.base import COLUMNS, SourceError
from l2rclip.data.sources.clap2015 import clap2015_source
from l2rclip.data.sources.demo import demo_source
from l2rclip.data.sources.faces import fgnet_source, utkface_source
from l2rclip.data.sources.generic import csv_source, folder_source
from l2rclip.data.sources.hci import hci_source
from l2rclip.data.sources.morph import morph_source

__all__ = ["ADIENCE_GROUPS", "COLUMNS", "SOURCES", "Source", "SourceError", "load_source"]

log = logging.getLogger(__name__)

Source = Callable[..., pd.DataFrame]

SOURCES: dict[str, Source] = {
    "csv": csv_source,
    "folder": folder_source,
    "fgnet": fgnet_source,
    "utkface": utkface_source,
    "morph": morph_source,
    "adience": adience_source,
    "hci": hci_source,
    "aesthetics": aesthetics_source,
    "clap2015": clap2015_source,
    "demo": demo_source,
}


def load_source(name: str, root: str | Path, list_file: str | Path | None = None, **options: Any) -> pd.DataFrame:
    """Read dataset `name` at `root` into the source table.

    Args:
        name: a key of `SOURCES`.
        root: the folder image paths are relative to.
        list_file: the source's label/split list (file or folder). A relative path is taken from
            the working directory when it exists there, else from `root`.
        **options: the adapter's own keyword options (only `demo` has some: n_per_rank,
            image_size, seed).

    Raises:
        SourceError: an unknown name or option (listing the known ones), or whatever the adapter
            finds structurally wrong with the data.
    """
    adapter = SOURCES.get(name)
    if adapter is None:
        raise SourceError(f"unknown source {name!r}; expected one of {', '.join(sorted(SOURCES))}")
    accepted = list(inspect.signature(adapter).parameters)[2:]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SourceError(
            f"source {name!r}: unknown option(s) {', '.join(unknown)}; "
            f"expected {', '.join(accepted) or 'no options'}"
        )
    root = Path(root)
    table = adapter(root, _resolve_list_file(root, list_file), **options)
    log.info("source %s at %s: %d rows, columns %s", name, root, len(table), ", ".join(table.columns))
    return table


def _resolve_list_file(root: Path, list_file: str | Path | None) -> Path | None:
    if list_file is None:
        return None
    path = Path(list_file)
    if path.is_absolute() or path.exists() or not (root / path).exists():
        return path
    return root / path
