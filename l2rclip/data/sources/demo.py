"""The `demo` source: the generated counting set, made on first use."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from l2rclip.data.demo import generate_demo
from l2rclip.data.sources.base import reject_list_file


def demo_source(root: Path, list_file: Path | None, n_per_rank: int = 60, image_size: int = 96,
                seed: int = 0) -> pd.DataFrame:
    """Generate the demo set under `root` unless it is there with these settings; return its table.

    Labels are the shape counts 1..10, groups the pseudo-subjects `g0000..` (see l2rclip.data.demo).
    """
    reject_list_file("demo", list_file)
    return generate_demo(root, n_per_rank=n_per_rank, image_size=image_size, seed=seed)
