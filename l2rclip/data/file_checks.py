"""What a listed path tells before the file is read: outside the root, not an image, not a file.

Every check here is a string operation or one `stat`, so validation runs them on every row and
predict on every input without reading a byte; what they find becomes the row's reason, so a
skipped file is always reported as such (a symlink loop is a loop, not a "missing file").
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

# The image files every source lists and every reader accepts (defined here, not in the sources, so
# that reading an image does not import the dataset adapters).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

Problem = tuple[str, str]  # (reason, detail)


def image_file_problem(file: str) -> Problem | None:
    """Why `file` cannot be an image input, from `stat` and its name alone (no read), or None."""
    return stat_problem(file) or extension_problem(file)


def outside_root(root: Path, file: str) -> Problem | None:
    """`outside_root` when `file` is neither under `root` as written nor once symlinks are resolved.

    Paths under the root as written pass even where they are symlinks to elsewhere (DVC's
    symlink cache type makes exactly those); an absolute path passes when it is inside the
    root's real location.
    """
    base, path = os.path.abspath(root), os.path.abspath(file)
    if os.path.commonpath([base, path]) == base:
        return None
    real_base, real_path = os.path.realpath(root), os.path.realpath(file)
    if os.path.commonpath([real_base, real_path]) == real_base:
        return None
    return (
        "outside_root",
        f"{file} is outside data.root {base}; move it under the root, or set "
        "data.allow_outside_root: true (DVC does not track files outside the root)",
    )


def extension_problem(file: str) -> Problem | None:
    """`unsupported_extension` unless the name ends in one of `IMAGE_EXTENSIONS` (any case)."""
    suffix = os.path.splitext(file)[1].lower()
    if suffix in IMAGE_EXTENSIONS:
        return None
    return (
        "unsupported_extension",
        f"{file} has extension {suffix or '(none)'!r}; expected one of {', '.join(sorted(IMAGE_EXTENSIONS))}",
    )


def stat_problem(file: str) -> Problem | None:
    """Why `file` cannot be read as an image file, from `stat` alone, or None."""
    try:
        info = os.stat(file)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symlink_loop", f"{file} is a symlink loop (resolving it never ends)"
        if os.path.islink(file):
            return "dangling_symlink", f"{file} is a symlink to {os.readlink(file)}, which does not exist"
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return "missing_file", f"no file at {file}"
        return "unreadable_file", f"{file}: {error.strerror}"
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder (symlinked folders are not followed)" if stat.S_ISDIR(info.st_mode) else "not a file"
        return "not_a_file", f"{file} is {kind}"
    if info.st_size == 0:
        return "empty_file", f"{file} has 0 bytes"
    return None
