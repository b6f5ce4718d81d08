"""The `demo` source: the generated counting set, read from the `demo` stage's folder."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from l2rclip.data.demo import DemoMismatchError, generate_demo, read_demo
from l2rclip.data.sources.base import SourceError, reject_list_file


def demo_source(
    root: Path, list_file: Path | None, n_per_rank: int = 60, image_size: int = 96, seed: int = 0
) -> pd.DataFrame:
    """The demo set under `root` made with these settings, as a source table.

    Labels are the shape counts 1..10, groups the pseudo-subjects `g0000..` (see l2rclip.data.demo).
    A folder that does not exist or is empty gets the set generated (first use, e.g. a test's or
    `l2rclip check`'s own folder); a folder that holds another demo set is never rewritten: that
    is the `demo` stage's output, so this refuses with what to run (SourceError).
    """
    reject_list_file("demo", list_file)
    try:
        table = read_demo(root, n_per_rank, image_size, seed)
    except DemoMismatchError as error:
        raise SourceError(str(error)) from None
    if table is not None:
        return table
    try:
        return generate_demo(root, n_per_rank=n_per_rank, image_size=image_size, seed=seed)
    except OSError as error:  # a read-only copy, a full disk: one line, not a traceback
        raise SourceError(
            f"cannot generate the demo set in {root}: {error.strerror or error} "
            "(run the `demo` stage where it can write, or set data.root to a writable "
            "folder)"
        ) from None
