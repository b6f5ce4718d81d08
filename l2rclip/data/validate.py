"""Check a source table row by row before anything trains on it, and load images as RGB.

Real datasets carry missing files, truncated downloads, odd pixel formats, typos in labels and
the same picture saved under two names. Finding them here, once, in one report, is cheaper than a
crash in epoch 3 or a silently wrong label. Every file is read exactly once: its bytes are hashed
(to find identical content under other names) and fully decoded (which is what catches truncated
files); this runs in a thread pool because hashing and PIL's decoding release the GIL.
Source files are only read, never changed.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from l2rclip.config import DataConfig
from l2rclip.data.columns import EXTRA_COLUMNS
from l2rclip.data.duplicates import ContentIndex
from l2rclip.data.file_checks import extension_problem, image_file_problem, outside_root, stat_problem
from l2rclip.ranks import RankSpace

log = logging.getLogger(__name__)

ALLOWED_COLUMNS = ("path", "label", "group", "fold", "split", *EXTRA_COLUMNS)
REPORT_COLUMNS = ("row", "path", "label", "reason", "detail")
WHITE = (255, 255, 255)
DEFAULT_MAX_PIXELS = DataConfig.max_image_pixels
# Integer modes whose values span 0..65535 (16-bit PNG/TIFF); PIL's convert() would clip them.
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# EXIF orientations 5..8 rotate by 90 degrees, so the displayed width is the stored height.
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112


class DataValidationError(ValueError):
    """A source table is malformed, or a bad row was found with `on_bad="fail"`."""


class ImageTooLargeError(ValueError):
    """An image has more pixels than `data.max_image_pixels` (a possible decompression bomb)."""


class UnusableImageError(ValueError):
    """A file that cannot be an image input; the message starts with the validation reason."""


class _Decoded(NamedTuple):
    """What decoding one file found: its metadata, or why it is bad."""

    width: int = 0
    height: int = 0
    mode: str = ""
    reason: str | None = None
    detail: str = ""
    digest: str = ""  # sha256 of the file's bytes
    fatal: bool = False  # stop even with on_bad="skip" (a conflict with data.duplicates: fail)


def check_max_pixels(max_pixels: int) -> int:
    """`max_pixels` when it is a positive integer; else a ValueError naming the params key."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"data.max_image_pixels: expected a positive integer, found {max_pixels!r}")
    return max_pixels


@contextmanager
def open_image(file: str | Path | io.BytesIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Image.Image]:
    """`Image.open` under the project's one decompression-bomb limit, `data.max_image_pixels`.

    Only the header has been read when the size is checked, so a small file that would decode
    into gigabytes costs nothing. PIL's own check (a warning above `Image.MAX_IMAGE_PIXELS`, an
    error above twice that) made the limit depend on whether the caller turned warnings into
    errors: 89.5 Mpx in prepare, 179 Mpx in predict and serving. Every reader goes through here
    instead (validation, `load_rgb`, hence predict and the served model). PIL's limit is raised
    to `max_pixels` when lower, so that PIL never refuses an image this limit admits; its
    refusal of a larger one is reported as this limit's.

    Raises:
        ValueError: `max_pixels` is not a positive integer.
        ImageTooLargeError: the image has more than `max_pixels` pixels.
    """
    check_max_pixels(max_pixels)
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    limit = f"the limit data.max_image_pixels = {max_pixels}"
    try:
        image = Image.open(file)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(f"more pixels than {limit} ({error})") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(f"{width}x{height} = {width * height} pixels, more than {limit}")
        yield image


def load_rgb(
    path: str | Path | io.BytesIO, background: tuple[int, int, int] = WHITE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Open an image as upright 8-bit RGB, whatever its stored format.

    Models expect RGB in 0..255; stored images may be greyscale, 16-bit, CMYK, palette, carry an
    alpha channel or an EXIF rotation. Doing every conversion here keeps validation and training
    reading pixels identically.

    Args:
        path: the image file.
        background: colour under transparent pixels (alpha is composited, not dropped, so a
            transparent region does not turn into whatever colour its hidden pixels hold).
        max_pixels: the decompression-bomb limit (see `open_image`).

    Returns:
        An RGB image, rotated as its EXIF orientation says.

    Raises:
        ImageTooLargeError: more than `max_pixels` pixels.
    """
    with open_image(path, max_pixels) as image:
        upright = ImageOps.exif_transpose(image)
    return to_rgb(upright, background)


def load_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`load_rgb` for inputs named by users (predict): first the checks validation makes of a path.

    Raises:
        UnusableImageError: "<reason>: <detail>" for an unsupported extension, a dangling symlink,
            a symlink loop, a missing file, something that is not a file, or an empty file.
    """
    _check_path(path)
    return load_rgb(path, max_pixels=max_pixels)


def check_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """The errors `load_image_file` would raise before decoding, from the path and the header alone.

    Prediction reads an image's pixels from the preprocess stage's store instead of decoding the
    file when it can; this keeps its answer for a bad or too large file the same either way.

    Raises:
        UnusableImageError: as `load_image_file`.
        ImageTooLargeError: more than `max_pixels` pixels.
    """
    _check_path(path)
    with open_image(path, max_pixels):
        pass  # only the header is read


def _check_path(path: str | Path) -> None:
    problem = image_file_problem(str(path))
    if problem is not None:
        raise UnusableImageError(f"{problem[0]}: {problem[1]}")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert a decoded image to 8-bit RGB: 16-bit scaled (not clipped), alpha composited."""
    if image.mode in _WIDE_MODES:
        wide = np.asarray(image, dtype=np.float64)  # (H, W)
        eight = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image.convert("RGB")


def validate_table(
    table: pd.DataFrame,
    root: str | Path,
    rank_space: RankSpace,
    on_bad: Literal["skip", "fail"] = "skip",
    workers: int | None = None,
    allow_outside_root: bool = False,
    duplicates: Literal["drop_conflicts", "keep_first", "fail"] = "drop_conflicts",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a source table into good rows and a report of bad ones.

    Bad reasons, from the path alone: `missing_file` (blank path), `duplicate` (the same path
    again with the same label; with another label it is a `conflicting_labels` below),
    `outside_root` (the path leaves `root`: `../x.png`, an absolute path elsewhere; symlinks
    inside `root` are followed, as DVC's symlink cache makes them), `unsupported_extension` (not
    one of `IMAGE_EXTENSIONS`); from the label: `missing_label`, `non_numeric_label` (text where
    the ranks are numbers), `label_not_in_ranks`; from `stat`: `missing_file`, `dangling_symlink`,
    `symlink_loop`, `not_a_file` (a folder, a device), `unreadable_file`, `empty_file`; from
    reading: `corrupt_image` (PIL cannot decode it all), `decompression_bomb` (more pixels than
    `max_pixels`, see `open_image`), `duplicate_content` (the same bytes as an earlier row, same
    label) and `conflicting_labels` (the same bytes, under this or another path, with another
    label: `duplicates` decides for both alike).

    Duplicates keep the first occurrence. They are looked for within each fold when the table
    lists every fold's own splits (`fold` and `split` columns: such lists name an image once per
    fold), else across the whole table, so that no picture is both trained and tested on.

    Args:
        table: the source table (`path`, `label`, optional `group`, `fold`, `split`).
        root: the folder that relative paths start from.
        rank_space: the ranks labels must belong to.
        on_bad: `skip` reports bad rows and goes on; `fail` raises at the first bad row.
        workers: decoding threads (None: one per CPU).
        allow_outside_root: accept paths that leave `root` instead of reporting `outside_root`.
        duplicates: identical files with different labels: `drop_conflicts` keeps none,
            `keep_first` the first row, `fail` raises.
        max_pixels: the decompression-bomb limit, `data.max_image_pixels` (see `open_image`).

    Returns:
        `(good, report)`. `good` keeps the table's columns (with `group` added as None when
        absent) plus `row` (the row number in `table`, from 0), `rank` (index in the rank space),
        `value`, and `width`, `height` (as displayed, after EXIF rotation) and `mode` (as stored).
        `report` has one row per bad row, in row order: `row`, `path`, `label`, `reason`, `detail`.

    Raises:
        DataValidationError: a missing or unknown column (always), the first bad row when
            `on_bad="fail"`, or the first conflicting duplicate when `duplicates="fail"`.
    """
    _check_columns(table)
    check_max_pixels(max_pixels)
    root = Path(root)
    files = [_resolve(root, path) for path in table["path"]]
    per_fold = {"fold", "split"} <= set(table.columns)
    folds = table["fold"].tolist() if per_fold else [None] * len(table)
    early = _early_reasons(table, files, folds, rank_space, None if allow_outside_root else root)
    to_decode = list(dict.fromkeys(f for f, r in zip(files, early, strict=True) if r is None))
    contents = ContentIndex(duplicates)
    good_rows: list[dict[str, Any]] = []
    bad_rows: list[dict[str, Any]] = []
    # Filters are process-wide, so the pool's threads see this one; the pool is shut down (inner
    # context) before the filters are restored.
    with (
        warnings.catch_warnings(),
        ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool,
        tqdm(total=len(to_decode), desc="decoding images", unit="img", disable=None) as progress,
    ):
        # PIL's own bomb warning only announces what `open_image` then refuses, so it is silenced.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        decoded = _in_order(pool.map(partial(_decode, max_pixels=max_pixels), to_decode), to_decode, progress)
        for row, (record, file, fold, reason) in enumerate(
            zip(table.to_dict("records"), files, folds, early, strict=True)
        ):
            result = decoded(file) if reason is None else _Decoded(reason=reason[0], detail=reason[1])
            if result.reason is None:
                index = rank_space.index_of(record["label"])
                duplicate = contents.check(row, record, index, (result.digest, fold))
                if duplicate is not None:
                    result = _Decoded(reason=duplicate.reason, detail=duplicate.detail, fatal=duplicate.fatal)
            if result.reason is None:
                good_rows.append(
                    {
                        "row": row,
                        **record,
                        "rank": index,
                        "value": float(rank_space.value_of(index)),
                        "width": result.width,
                        "height": result.height,
                        "mode": result.mode,
                    }
                )
                continue
            if on_bad == "fail" or result.fatal:
                pool.shutdown(wait=False, cancel_futures=True)
                hint = f"; {ranks_hint(table['label'])}" if result.reason == "label_not_in_ranks" else ""
                raise DataValidationError(
                    f"{_row_where(table, row, record['path'])}: {result.reason}: {result.detail}{hint}"
                )
            bad_rows.append(
                {
                    "row": row,
                    "path": record["path"],
                    "label": record["label"],
                    "reason": result.reason,
                    "detail": result.detail,
                }
            )
    good_rows, bad_rows = contents.drop_conflicts(good_rows, bad_rows)
    good, report = _frames(table, good_rows, bad_rows)
    _log_counts(len(table), good, report)
    outside = int((report["reason"] == "label_not_in_ranks").sum())
    if outside:
        log.warning(
            "%d rows have labels outside the ranks %s; %s",
            outside,
            rank_space.describe(),
            ranks_hint(table["label"]),
        )
    return good, report


def ranks_hint(labels: Iterable[Any]) -> str:
    """The `ranks` setting of params.yaml that would cover every label found.

    A user's own data rarely has the demo's ranks 1..10; the error for a label outside the ranks says
    what to set instead: the observed range for integer labels, the list of labels otherwise.
    """
    present = [label for label in labels if not _is_blank(label)]
    integers = [number for label in present if (number := _as_integer(label)) is not None]
    if present and len(integers) == len(present):
        low, high = min(integers), max(integers)
        return (
            f"the labels found run from {low} to {high} ({len(set(integers))} distinct): set ranks.start: "
            f"{low} and ranks.stop: {high} in params.yaml to cover them (or list the ranks in "
            "ranks.labels, with ranks.values for their numbers)"
        )
    distinct = sorted({str(label).strip() for label in present})
    shown = ", ".join(distinct[:12]) + (f", ... ({len(distinct)} in all)" if len(distinct) > 12 else "")
    return (
        f"the labels found are {shown}: list them in rank order as ranks.labels in params.yaml "
        "(with ranks.values for their numbers)"
    )


def _is_blank(label: Any) -> bool:
    return label is None or (isinstance(label, float) and np.isnan(label)) or str(label).strip() == ""


def _as_integer(label: Any) -> int | None:
    """`label` as an int when it is one (20, "20", 20.0), else None."""
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        return int(label)
    try:
        number = float(str(label).strip())
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _row_where(table: pd.DataFrame, row: int, path: Any) -> str:
    """Where a row came from, with its image path.

    For a CSV list its file and data row (as the CSV source's own errors say), else its place in the
    source table.
    """
    list_file = table.attrs.get("list_file")
    return f"{list_file}, data row {row + 1} ({path})" if list_file else f"row {row} of the source table ({path})"


def _check_columns(table: pd.DataFrame) -> None:
    """Reject tables whose columns do not follow the source contract (a structural error)."""
    expected = ", ".join(ALLOWED_COLUMNS)
    for column in table.columns:
        if column not in ALLOWED_COLUMNS:
            raise DataValidationError(f"source table has unknown column {column!r}; expected columns: {expected}")
    for column in ("path", "label"):
        if column not in table.columns:
            raise DataValidationError(
                f"source table lacks required column {column!r}; expected columns: {expected}"
            )


def _resolve(root: Path, path: Any) -> str:
    """Normalised file name of a table path (absolute paths stay as they are); '' when blank."""
    if path is None or (isinstance(path, float) and np.isnan(path)) or not str(path).strip():
        return ""
    return os.path.normpath(root / str(path).strip())


def _early_reasons(
    table: pd.DataFrame, files: list[str], folds: list[Any], rank_space: RankSpace, root: Path | None
) -> list[tuple[str, str] | None]:
    """Reasons that need no file access (path, duplicates, labels), one per row or None.

    `root` None accepts paths outside the root.
    """
    first_seen: dict[tuple[str, Any], int] = {}
    reasons: list[tuple[str, str] | None] = []
    for row, (file, fold, label) in enumerate(zip(files, folds, table["label"], strict=True)):
        key = (file, fold)
        if not file:
            reasons.append(("missing_file", "the path is blank"))
        elif key in first_seen and _same_label(table["label"].iat[first_seen[key]], label, rank_space):
            where = "" if fold is None else f" in fold {fold}"
            reasons.append(("duplicate", f"same path as row {first_seen[key]}{where}; the first is kept"))
        elif key in first_seen:
            # The same file under another label is a label conflict like the same bytes under two
            # names: decoding finds the same content and `data.duplicates` decides (ContentIndex).
            reasons.append(_label_reason(label, rank_space))
        else:
            first_seen[key] = row
            # A folder is reported as not_a_file (by the stat check), whatever its name.
            wrong_type = not os.path.isdir(file) and extension_problem(file)
            reasons.append(
                (root is not None and outside_root(root, file)) or wrong_type or _label_reason(label, rank_space)
            )
    return reasons


def _same_label(first: Any, label: Any, rank_space: RankSpace) -> bool:
    """Whether two labels name the same rank ("20", 20 and 20.0 do), or are the same text when not ranks."""
    if rank_space.contains(first) and rank_space.contains(label):
        return rank_space.index_of(first) == rank_space.index_of(label)
    return str(first).strip() == str(label).strip()


def _label_reason(label: Any, rank_space: RankSpace) -> tuple[str, str] | None:
    """Why a label cannot be mapped to a rank, or None when it can."""
    if _is_blank(label):
        return "missing_label", f"the label is blank; expected one of {rank_space.describe()}"
    if rank_space.contains(label):
        return None
    expected = f"expected one of {rank_space.describe()}"
    numeric_space = all(isinstance(x, (int, float, np.number)) for x in rank_space.labels)
    if numeric_space and not _is_number(label):
        return "non_numeric_label", f"label {label!r} is not a number; {expected}"
    return "label_not_in_ranks", f"label {label!r} is not a rank; {expected}"


def _is_number(label: Any) -> bool:
    try:
        float(label)
    except (TypeError, ValueError):
        return False
    return True


def _decode(file: str, max_pixels: int) -> _Decoded:
    """Read one file once, hash its bytes and fully decode them: its metadata or why it is bad."""
    problem = stat_problem(file)
    if problem is not None:
        return _Decoded(reason=problem[0], detail=problem[1])
    try:
        data = Path(file).read_bytes()
    except OSError as error:
        return _Decoded(reason="unreadable_file", detail=f"{file}: {error.strerror}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with open_image(io.BytesIO(data), max_pixels) as image:
            image.load()
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            width, height = image.size
            mode = image.mode
    except ImageTooLargeError as error:
        return _Decoded(reason="decompression_bomb", detail=str(error))
    except UnidentifiedImageError:  # its own message names the in-memory buffer, not the file
        return _Decoded(
            reason="corrupt_image", detail=f"UnidentifiedImageError: cannot identify image file {file!r}"
        )
    except Exception as error:  # noqa: BLE001 - PIL's format plugins raise many types on bad bytes
        return _Decoded(reason="corrupt_image", detail=f"{type(error).__name__}: {error}")
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return _Decoded(width, height, mode, digest=digest)


def _in_order(results: Iterator[_Decoded], files: list[str], progress: tqdm) -> Callable[[str], _Decoded]:
    """Lookup `file -> result` that pulls results from the pool lazily, in submission order.

    Rows are visited in order and each file is first needed in the order it was submitted, so
    the next unseen file is always the next result: output order is deterministic and
    `on_bad="fail"` stops at the first bad row without waiting for later images.
    """
    done: dict[str, _Decoded] = {}
    pending = iter(files)

    def lookup(file: str) -> _Decoded:
        while file not in done:
            done[next(pending)] = next(results)
            progress.update()
        return done[file]

    return lookup


def _frames(
    table: pd.DataFrame, good_rows: list[dict[str, Any]], bad_rows: list[dict[str, Any]]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Good and report tables with fixed columns, even when empty."""
    columns = [
        "row",
        *[c for c in ALLOWED_COLUMNS if c in table.columns or c == "group"],
        "rank",
        "value",
        "width",
        "height",
        "mode",
    ]
    good = pd.DataFrame(good_rows, columns=columns)
    good["group"] = good["group"].astype(object).where(good["group"].notna(), None)
    good = good.astype({"row": "int64", "rank": "int64", "value": "float64", "width": "int64", "height": "int64"})
    return good, pd.DataFrame(bad_rows, columns=list(REPORT_COLUMNS))


def _log_counts(total: int, good: pd.DataFrame, report: pd.DataFrame) -> None:
    """Log how many rows passed and, for the rest, how many per reason."""
    reasons = report["reason"].value_counts().sort_index()
    detail = ", ".join(f"{reason}: {count}" for reason, count in reasons.items())
    log.info(
        "validated %d rows: %d good, %d bad%s", total, len(good), len(report), f" ({detail})" if detail else ""
    )
    for bad in report.head(5).itertuples():
        log.warning("bad row %d (%s): %s: %s", bad.row, bad.path, bad.reason, bad.detail)
    if len(report) > 5:
        log.warning("... and %d more bad rows (see the report)", len(report) - 5)
