"""The table every source returns, its error type, and the helpers the adapters share.

A source turns one dataset's on-disk layout into a single DataFrame so that everything after it
(validation, splitting, torch datasets) is written once. Sources only read listings: they never
open images and never check labels against the rank space; a later validation step does both and
reports bad rows. What a source does reject, with `SourceError`, is structure that makes the
whole listing meaningless: a missing root or list file, a list with the wrong columns, no rows.

The table:
    path   str   image path relative to the source root (or absolute, if the list says so).
    label  int where the text is an integer, else the raw text (e.g. "(25, 32)" or a bad value);
           the column is int64 when every label is an integer, else object.
    group  str   person/subject/category id, or None where the dataset has none (or a row is blank).
    fold   int   only where the dataset gives folds (Adience files, MORPH fold lists, a CSV).
    split  str   only where the dataset gives splits: "train", "val" or "test".
Extra columns (`EXTRA_COLUMNS`), only where a published list carries them, kept for later stages:
    race, gender  MORPH settings A and B (the list's codes as given; A and B code gender differently).
    category      aesthetics category (animals, nature, people, urban).
    stdv          CLAP2015: standard deviation of the human age guesses (the epsilon error uses it).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from l2rclip.data.columns import EXTRA_COLUMNS
from l2rclip.data.file_checks import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

COLUMNS = ("path", "label", "group", "fold", "split")

_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_INTEGER = re.compile(r"[+-]?\d+")

Row = dict[str, Any]


class SourceError(ValueError):
    """A dataset's layout or list file cannot be read as a source table."""


def require_dir(path: Path, what: str) -> Path:
    """Return `path` if it is a directory, else fail saying which directory was expected."""
    if not path.is_dir():
        raise SourceError(
            f"{what}: expected a directory at {path}, found {'a file' if path.exists() else 'nothing'}"
        )
    return path


def require_file(path: Path, what: str) -> Path:
    """Return `path` if it is a file, else fail saying which file was expected."""
    if not path.is_file():
        raise SourceError(
            f"{what}: expected a file at {path}, found {'a directory' if path.exists() else 'nothing'}"
        )
    return path


def reject_list_file(source: str, list_file: Path | None) -> None:
    """Fail for sources whose labels come from the layout alone, so a stray setting is not ignored."""
    if list_file is not None:
        raise SourceError(
            f"source '{source}' takes no list file (labels come from its layout); found list_file={list_file}"
        )


def to_label(text: Any) -> Any:
    """Integer labels become `int`; anything else is kept as stripped text for validation to report."""
    value = str(text).strip()
    return int(value) if _INTEGER.fullmatch(value) else value


def round_half_up(text: Any) -> Any:
    """Round a score to the nearest integer label, halves upwards (Python's `round` goes to even).

    Scores that are not finite numbers are returned as raw text, so validation reports the row.
    """
    try:
        value = float(text)
    except (TypeError, ValueError):
        return str(text).strip()
    return math.floor(value + 0.5) if math.isfinite(value) else str(text).strip()


def split_name(text: Any, where: str) -> str:
    """Normalise a split name ("valid", "Validation" -> "val"); anything unknown is structural."""
    name = _SPLIT_NAMES.get(str(text).strip().lower())
    if name is None:
        raise SourceError(f"{where}: expected a split in {sorted(_SPLIT_NAMES)}, found {text!r}")
    return name


def fold_id(text: Any, where: str) -> int:
    """Parse a fold id; a fold that is not an integer would silently break the protocol."""
    value = str(text).strip()
    if not _INTEGER.fullmatch(value):
        raise SourceError(f"{where}: expected an integer fold id, found {text!r}")
    return int(value)


def read_table(
    path: Path, required: Sequence[str], optional: Sequence[str] = (), sep: str | None = None
) -> pd.DataFrame:
    """Read a delimited list file as text, checking its header.

    Every cell stays a string (so "001" keeps its zeros and labels are interpreted by the caller).

    Args:
        path: the list file; `.tsv` and `.txt` default to tabs, anything else to commas.
        required: columns that must be present.
        optional: columns that may be present (named in the error message only).
        sep: the delimiter, overriding the default from the extension.

    Raises:
        SourceError: the file is missing, unreadable, lacks a required column or has no rows.
    """
    require_file(path, "list file")
    if sep is None:
        sep = "\t" if path.suffix.lower() in {".tsv", ".txt"} else ","
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise SourceError(f"{path}: cannot read as a {sep!r}-separated table: {error}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        extra = f" (optional: {', '.join(optional)})" if optional else ""
        raise SourceError(
            f"{path}: expected columns {', '.join(required)}{extra}; "
            f"found {', '.join(frame.columns) or 'none'} (missing {', '.join(missing)})"
        )
    if frame.empty:
        raise SourceError(f"{path}: the list has a header but no rows")
    return frame


def pick_column(
    frame: pd.DataFrame, path: Path, options: Sequence[str], what: str, required: bool = True
) -> str | None:
    """Find the first of `options` among the columns, for formats whose names vary between copies.

    Raises:
        SourceError: `required` and none is present (naming the file, the options and the columns).
    """
    for option in options:
        if option in frame.columns:
            return option
    if required:
        raise SourceError(
            f"{path}: expected a {what} column named one of {', '.join(options)}; found {', '.join(frame.columns)}"
        )
    return None


def list_files(folder: Path) -> list[Path]:
    """Every entry anywhere under `folder` except folders, sorted, skipping hidden files and folders.

    Not only images: files of other types, dangling symlinks, symlink loops and symlinks to folders
    (which are not followed) are listed too, so that validation reports each with its reason
    (`unsupported_extension`, `dangling_symlink`, ...) instead of them vanishing without a word.
    """
    return sorted(
        p
        for p in folder.rglob("*")
        if (p.is_symlink() or not p.is_dir())
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def is_image_name(path: Path) -> bool:
    """Whether the file name has one of the image extensions l2rclip reads."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def relative(path: Path, root: Path) -> str:
    """Posix path of `path` relative to `root` (the table's `path` column)."""
    return path.relative_to(root).as_posix()


def image_folder(root: Path) -> Path:
    """`root/images` when it exists (the layout of ../shared/data), else `root` itself."""
    return root / "images" if (root / "images").is_dir() else root


def parse_file_names(root: Path, folder: Path, parse: Callable[[str], Row | None]) -> list[Row]:
    """Rows for every image under `folder`, with label (and group) taken from its file name.

    Args:
        root: the source root; paths are made relative to it.
        folder: where to look for images (every file is listed, see `list_files`).
        parse: file name -> {"label": ..., "group": ...}, or None when the name does not match.
            A name that does not match is kept with the file name as its label, so that
            validation reports it instead of it vanishing silently.
    """
    images = list_files(folder)
    if not any(map(is_image_name, images)):
        raise SourceError(f"{folder}: expected image files ({', '.join(sorted(IMAGE_EXTENSIONS))}), found none")
    rows = []
    for image in images:
        parsed = parse(image.name)
        if parsed is None:
            log.debug("%s: file name does not match the expected pattern", image)
            parsed = {"label": image.name, "group": None}
        rows.append({"path": relative(image, root), **parsed})
    return rows


def scan_label_folders(root: Path, label_of: Callable[[str], Any]) -> list[Row]:
    """Rows for `root/<label folder>/.../<image>`, the label derived from the top folder's name."""
    require_dir(root, "image root")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    stray = [p.name for p in root.iterdir() if p.is_file() and is_image_name(p)]
    if stray:
        log.warning(
            "%s: %d image(s) directly in the root have no label folder and are ignored, e.g. %s",
            root,
            len(stray),
            sorted(stray)[0],
        )
    rows = [
        {"path": relative(image, root), "label": label_of(folder.name), "group": None}
        for folder in folders
        for image in list_files(folder)
    ]
    if not any(is_image_name(Path(row["path"])) for row in rows):
        raise SourceError(
            f"{root}: expected images in per-label folders <root>/<label>/<image>, "
            f"found {len(folders)} folder(s) and no images in them"
        )
    return rows


def make_table(rows: Iterable[Mapping[str, Any]], where: str) -> pd.DataFrame:
    """Assemble rows into the source table, in the order given, with the contract's columns.

    Adapters give `fold` / `split` on every row or on none; the columns appear only in the first
    case. Blank groups become None; labels become an int64 column when all are integers.
    """
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        raise SourceError(f"{where}: the listing has no rows")
    if "group" not in frame.columns:
        frame["group"] = None
    group = frame["group"].astype(object)
    frame["group"] = group.where(group.notna() & (group.astype(str).str.strip() != ""), None)
    integer = frame["label"].map(lambda x: isinstance(x, int) and not isinstance(x, bool)).all()
    frame["label"] = frame["label"].astype("int64" if integer else object)
    if "fold" in frame.columns:
        frame["fold"] = frame["fold"].astype("int64")
    return frame[[c for c in (*COLUMNS, *EXTRA_COLUMNS) if c in frame.columns]].reset_index(drop=True)


def read_lines(path: Path) -> list[str]:
    """Non-blank lines of a text list, stripped.

    The published lists mix LF and CRLF endings and some lack a final newline; a byte-order mark
    is tolerated.
    """
    require_file(path, "list file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise SourceError(f"{path}: expected a UTF-8 text list, found undecodable bytes: {error}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


class NameIndex:
    """Find a listed image under `root` by its path, else by its file name anywhere below `root`.

    Published lists point into their authors' folder tree (`../../datasets/Morph/image/x.JPG`)
    or name a bare file whose folder depends on the copy (`image_1.jpg` in `train/` or `valid/`).
    A listed path that exists inside `root` is used as it is; otherwise the file name is looked up
    in an index of every image below `root`, built once on first need. A name found nowhere keeps
    the listed path (or, when that points outside `root`, the bare file name), so validation
    reports the row as `missing_file` naming where it looked.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_name: dict[str, str] | None = None
        self._located: dict[str, str] = {}  # fold lists repeat each image once per fold

    def locate(self, listed: str) -> str:
        """The table path (relative to root) for one listed image path."""
        found = self._located.get(listed)
        if found is None:
            found = self._located[listed] = self._find(listed)
        return found

    def _find(self, listed: str) -> str:
        listed_path = Path(listed.strip())
        inside = None if ".." in listed_path.parts or listed_path.is_absolute() else listed_path.as_posix()
        if inside is not None and (self.root / inside).is_file():
            return inside
        return self._index().get(listed_path.name, inside or listed_path.name)

    def _index(self) -> dict[str, str]:
        if self._by_name is None:
            self._by_name = {}
            for image in filter(is_image_name, list_files(self.root)):
                path = relative(image, self.root)
                if self._by_name.setdefault(image.name, path) != path:
                    log.warning(
                        "%s: file name %s found more than once (%s, %s); the first is used",
                        self.root,
                        image.name,
                        self._by_name[image.name],
                        path,
                    )
            log.info("%s: indexed %d image file names", self.root, len(self._by_name))
        return self._by_name
