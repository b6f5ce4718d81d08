"""The promotion holdout: images no model of this project ever trains on, for the retrain gate.

The retrain flow decides whether a new model replaces the champion. Scoring both on the new run's
test split is biased: that split is redrawn whenever data changes, so many of its images were in
the champion's training split (66 % in one measured run), which favours the champion. The gate set
must be one that *neither* model trained on, now or in any earlier run.

Membership is therefore a pure function of an image's group (subject) id, or of its path when it
has no group: `sha256(salt + key)` read as a number in [0, 1) is below `fraction`. It does not depend
on the other images, the seed or the order of rows, so adding data never moves an old image into or
out of the holdout, and all images of one person fall on the same side. The holdout rows are
removed before the folds are drawn (from every fold's train, val and test). Changing `fraction` or
`salt` redefines the set, so the gate refuses to compare models made under different definitions.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

HOLDOUT_COLUMNS = ("path", "group", "label", "rank", "value")


def holdout_key(row_group: object, path: str) -> str:
    """The identity an image's holdout membership hangs on: its group, else its path."""
    return path if row_group is None or pd.isna(row_group) or str(row_group) == "" else f"group:{row_group}"


def holdout_mask(table: pd.DataFrame, fraction: float, salt: str) -> np.ndarray:
    """Boolean (N,): which rows of `table` belong to the promotion holdout."""
    if fraction <= 0:
        return np.zeros(len(table), dtype=bool)
    groups = table["group"] if "group" in table.columns else pd.Series([None] * len(table), index=table.index)
    keys = [holdout_key(g, str(p)) for g, p in zip(groups, table["path"], strict=True)]
    draws = np.array([int(hashlib.sha256(f"{salt}\0{k}".encode()).hexdigest()[:13], 16) / 16**13 for k in keys])
    return draws < fraction


def split_holdout(table: pd.DataFrame, fraction: float, salt: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows for the folds, holdout rows); both keep the table's row order and columns."""
    mask = holdout_mask(table, fraction, salt)
    return table[~mask].reset_index(drop=True), table[mask].reset_index(drop=True)


def holdout_spec(fraction: float, salt: str) -> str:
    """The definition of the set, recorded on every registered version (`fraction=0.1;salt=...`)."""
    return f"fraction={fraction:g};salt={salt}"


def holdout_version(holdout: pd.DataFrame) -> str:
    """A short hash of the holdout's images and labels: which gate set a decision used."""
    columns = [c for c in ("path", "label") if c in holdout.columns]
    text = holdout[columns].sort_values(columns[0]).to_csv(index=False, lineterminator="\n")
    return hashlib.sha256(text.encode()).hexdigest()[:16]
