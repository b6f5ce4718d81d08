"""Per-fold train / val / test assignment for the protocols of docs/method.md, section 6.

The result is one long table with a row per (image, fold): `fold`, `split`, then the image's
`path`, `group`, `label`, `rank`, `value`. One table for all folds makes the guarantees easy to
check in a single place: no group (person) on two sides of a fold, every image in one test fold
(`kfold`, `logo`), validation taken from the training part only. Everything random is drawn from
generators derived from the seed and the fold, so the same seed gives the same table.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from l2rclip.config import SplitConfig, section_problems
from l2rclip.data.columns import EXTRA_COLUMNS
from l2rclip.ranks import RankSpace

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CALIB = "calib"  # conformal calibration split: carved from train, never used for training or selection
FOLD_SPLITS = ("train", "val", CALIB, "test")  # the split values make_splits writes, in its order
CARRIED_COLUMNS = ("path", "group", "label", "rank", "value", *EXTRA_COLUMNS)


class SplitError(ValueError):
    """The split settings cannot be satisfied by the data (or contradict each other)."""


class _Fold(NamedTuple):
    """Row positions of one fold; `val` None means "carve it from train"."""

    train: np.ndarray
    test: np.ndarray
    val: np.ndarray | None = None


def make_splits(table: pd.DataFrame, config: SplitConfig, seed: int, rank_space: RankSpace) -> pd.DataFrame:
    """Assign every row of a validated table to train / val / test in each fold.

    Protocols: `kfold` (label-stratified, group-disjoint k-fold; a row without a group is its own
    group), `logo` (one fold per group), `given` (the table's `fold` and/or `split` columns) and
    `repeats` (`n_repeats` random draws of `n_train`/`n_val`/`n_test` images per rank). Except
    for `repeats` and a given `val` split, validation is one of `round(1 / val_fraction)`
    stratified, group-disjoint parts of the fold's training part; likewise `calib_fraction` carves
    the conformal calibration split (`calib`) from what remains. Then, on training rows only,
    `shift_keep` thins the most frequent ranks or `few_shot` keeps k images per rank.

    Args:
        table: validated rows with at least `path` and `rank` (and `group`, `fold`, `split`
            where the protocol uses them).
        config: the `split` section of params.yaml.
        seed: the stage seed.
        rank_space: the ranks, to find those without training images.

    Returns:
        Columns `fold`, `split` and those of `path, group, label, rank, value` and the sources'
        extra columns (race, gender, category, stdv) that the table has, ordered by fold, then
        train / val / test, then table row.

    Raises:
        SplitError: contradictory settings, too few images or groups for the protocol, an
            empty split, or a rank without training images when `missing_ranks` is `error`.
    """
    _check_options(config)
    if config.protocol != "given" and not table["path"].is_unique:
        raise SplitError(
            f"protocol {config.protocol} needs each image once, but the table lists some "
            "more than once (per-fold lists); use protocol given"
        )
    ranks = table["rank"].to_numpy(dtype=np.int64)
    groups = _group_ids(table)
    folds = _PROTOCOLS[config.protocol](table, ranks, groups, config, seed, rank_space)
    columns = [c for c in CARRIED_COLUMNS if c in table.columns]
    parts = []
    for number, fold in enumerate(folds):
        rng = np.random.default_rng([seed, number])
        train, val = fold.train, fold.val
        if val is None:
            train, val = _carve_val(train, ranks, groups, config.val_fraction, rng, number, rank_space)
        train, calib = _carve_calib(
            train,
            ranks,
            groups,
            config.calib_fraction,
            number,
            np.random.default_rng([seed, number, 2]),
            rank_space,
        )
        train = _thin_train(train, ranks, config, rng)
        for name, rows in (("train", train), ("test", fold.test)):
            if len(rows) == 0:
                raise SplitError(
                    f"fold {number}: the {name} split is empty "
                    f"(protocol {config.protocol}, {len(table)} images in all)"
                )
        _check_ranks(number, ranks[train], rank_space, config.missing_ranks)
        for name, rows in zip(FOLD_SPLITS, (train, val, calib, fold.test), strict=True):
            part = table.iloc[np.sort(rows)][columns]
            parts.append(part.assign(fold=number, split=name))
    splits = pd.concat(parts, ignore_index=True)[["fold", "split", *columns]]
    log.info("protocol %s: %d folds, %d rows", config.protocol, len(folds), len(splits))
    return splits


def select(splits: pd.DataFrame, fold: int, split: str) -> pd.DataFrame:
    """Return the rows of one fold's split; an absent fold or empty split is an error naming both."""
    rows = splits[(splits["fold"] == fold) & (splits["split"] == split)]
    if rows.empty:
        folds = sorted(splits["fold"].unique().tolist())
        raise SplitError(
            f"no rows for fold {fold}, split {split!r}; folds present: {folds}, splits: {', '.join(FOLD_SPLITS)}"
        )
    return rows.reset_index(drop=True)


def read_splits(path: str | Path) -> pd.DataFrame:
    """Read a `splits.csv` written by the prepare stage (paths and groups stay text)."""
    splits = pd.read_csv(path, dtype={"path": str, "group": str, "split": str})
    splits["group"] = splits["group"].astype(object).where(splits["group"].notna(), None)
    return splits


def _check_options(config: SplitConfig) -> None:
    """Reject settings that make no sense before touching the data.

    These are the checks of params loading, repeated for callers that build a `SplitConfig`.
    """
    problems = section_problems(config, "split")
    if problems:
        raise SplitError("; ".join(problems))


def _group_ids(table: pd.DataFrame) -> np.ndarray:
    """Integer group per row; rows without a group (or tables without groups) get their own."""
    if "group" not in table.columns:
        return np.arange(len(table), dtype=np.int64)
    named = table["group"].map(lambda g: None if g is None or pd.isna(g) else str(g))
    codes, _ = pd.factorize(named, sort=True)
    loose = codes < 0
    codes[loose] = codes.max(initial=-1) + 1 + np.arange(loose.sum())
    return codes.astype(np.int64)


def _has_groups(table: pd.DataFrame) -> bool:
    return "group" in table.columns and bool(table["group"].notna().any())


def _stratified_group_parts(
    n_parts: int, ranks: np.ndarray, groups: np.ndarray, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Label-stratified, group-disjoint parts; rare ranks (fewer images than parts) are expected.

    Without real groups (one row each) `StratifiedKFold` gives the same guarantees far faster:
    `StratifiedGroupKFold` loops over groups in Python (15 s instead of 0.1 s for UTKFace). It
    needs one rank with at least `n_parts` images, which tiny tables may lack.
    """
    rows, seed = np.zeros(len(ranks)), int(rng.integers(2**31 - 1))  # sklearn takes an int seed
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        if len(np.unique(groups)) == len(groups) and np.bincount(ranks).max() >= n_parts:
            return list(StratifiedKFold(n_parts, shuffle=True, random_state=seed).split(rows, ranks))
        splitter = StratifiedGroupKFold(n_parts, shuffle=True, random_state=seed)
        return list(splitter.split(rows, ranks, groups))


def _kfold(
    table: pd.DataFrame,
    ranks: np.ndarray,
    groups: np.ndarray,
    config: SplitConfig,
    seed: int,
    rank_space: RankSpace,
) -> list[_Fold]:
    n_groups = len(np.unique(groups))
    if n_groups < config.n_folds:
        kind = "groups (subjects)" if _has_groups(table) else "images"
        raise SplitError(f"kfold: {config.n_folds} folds need at least {config.n_folds} {kind}, found {n_groups}")
    _check_stratifiable(
        config.n_folds,
        ranks,
        rank_space,
        f"kfold: split.n_folds {config.n_folds}",
        "set split.n_folds to at most {largest}",
    )
    parts = _stratified_group_parts(config.n_folds, ranks, groups, np.random.default_rng(seed))
    return [_Fold(train, test) for train, test in parts]


def _logo(
    table: pd.DataFrame,
    ranks: np.ndarray,
    groups: np.ndarray,
    config: SplitConfig,
    seed: int,
    rank_space: RankSpace,
) -> list[_Fold]:
    if "group" not in table.columns or table["group"].isna().any():
        missing = len(table) if "group" not in table.columns else int(table["group"].isna().sum())
        raise SplitError(
            f"logo (leave one group out) needs a group on every row; {missing} of {len(table)} rows have none"
        )
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise SplitError(f"logo needs at least 2 groups, found {n_groups}")
    rows = np.arange(len(table))
    return [_Fold(rows[groups != g], rows[groups == g]) for g in range(n_groups)]


def _given(
    table: pd.DataFrame,
    ranks: np.ndarray,
    groups: np.ndarray,
    config: SplitConfig,
    seed: int,
    rank_space: RankSpace,
) -> list[_Fold]:
    has_fold, has_split = "fold" in table.columns, "split" in table.columns
    if not (has_fold or has_split):
        raise SplitError(
            "protocol given needs a fold or split column from the source; found neither "
            f"(columns: {', '.join(map(str, table.columns))})"
        )
    rows = np.arange(len(table))
    if has_split:
        unknown = sorted(set(table["split"].astype(str)) - set(SPLITS))
        if unknown:
            raise SplitError(f"given: split values must be {', '.join(SPLITS)}; found {unknown}")
        split = table["split"].astype(str).to_numpy()
    fold_column = table["fold"].to_numpy() if has_fold else np.zeros(len(table), dtype=np.int64)
    fold_ids = np.unique(fold_column)
    folds = []
    for fold_id in fold_ids:
        inside = fold_column == fold_id
        if has_split:  # each fold (or the single list) names its own train / val / test
            train, val, test = (rows[inside & (split == name)] for name in SPLITS)
            folds.append(_Fold(train, test, val if len(val) else None))
        else:  # fold ids: test is the fold, train the rest
            folds.append(_Fold(rows[~inside], rows[inside]))
    if has_fold:
        log.info("given folds %s are numbered 0..%d", fold_ids.tolist(), len(fold_ids) - 1)
    for number, fold in enumerate(folds):
        shared = np.intersect1d(groups[fold.train], groups[fold.test])
        if len(shared):
            log.warning(
                "given fold %d: %d groups have images in both train and test (the source's "
                "protocol is not subject-exclusive)",
                number,
                len(shared),
            )
    return folds


def _repeats(
    table: pd.DataFrame,
    ranks: np.ndarray,
    groups: np.ndarray,
    config: SplitConfig,
    seed: int,
    rank_space: RankSpace,
) -> list[_Fold]:
    if _has_groups(table):
        raise SplitError(
            "repeats draws single images per rank, which would put one group (subject) "
            "on both sides; use kfold or logo for grouped data"
        )
    need = config.n_train + config.n_val + config.n_test
    counts = np.bincount(ranks)
    short = [(r, c) for r, c in enumerate(counts) if 0 < c < need]
    if short:
        listed = ", ".join(f"rank {r} has {c}" for r, c in short)
        raise SplitError(f"repeats needs n_train + n_val + n_test = {need} images per rank; {listed}")
    folds = []
    for repeat in range(config.n_repeats):
        rng = np.random.default_rng([seed, repeat, 1])
        drawn = [rng.permutation(np.flatnonzero(ranks == r)) for r in np.unique(ranks)]
        cuts = (0, config.n_train, config.n_train + config.n_val, need)
        train, val, test = (np.concatenate([d[a:b] for d in drawn]) for a, b in itertools.pairwise(cuts))
        folds.append(_Fold(train, test, val))
    return folds


_PROTOCOLS = {"kfold": _kfold, "logo": _logo, "given": _given, "repeats": _repeats}


def _carve_val(
    train: np.ndarray,
    ranks: np.ndarray,
    groups: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
    fold: int,
    rank_space: RankSpace,
) -> tuple[np.ndarray, np.ndarray]:
    """Move one stratified, group-disjoint part of `train` (about `fraction`) to validation."""
    return _carve_part(train, ranks, groups, fraction, rng, fold, rank_space, "val_fraction", "validation")


def _carve_part(
    train: np.ndarray,
    ranks: np.ndarray,
    groups: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
    fold: int,
    rank_space: RankSpace,
    key: str,
    purpose: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(rest of `train`, one stratified group-disjoint part of about `fraction`), for `split.<key>`.

    Every way the part cannot be drawn is an error naming the fold, `split.<key>` and what to set.
    """
    if fraction == 0:
        return train, train[:0]
    n_parts = max(2, round(1 / fraction))
    n_groups = len(np.unique(groups[train]))
    if n_groups < n_parts:
        raise SplitError(
            f"fold {fold}: the training part has {n_groups} groups/images, too few to "
            f"carve {key} {fraction} (1 of {n_parts} group-disjoint parts); "
            f"lower split.{key} or set it to 0"
        )
    _check_stratifiable(
        n_parts,
        ranks[train],
        rank_space,
        f"fold {fold}: split.{key} {fraction} (1 of {n_parts} parts of the training part)",
        f"set split.{key} to at least {{fraction}} (1/{{largest}}; or 0: no {purpose}), "
        "or lower split.n_folds so that each fold trains on more images",
    )
    keep, part = _stratified_group_parts(n_parts, ranks[train], groups[train], rng)[0]
    if len(part) == 0:
        raise SplitError(f"fold {fold}: the {purpose} split is empty after carving {key} {fraction}")
    return train[keep], train[part]


def _check_stratifiable(n_parts: int, ranks: np.ndarray, rank_space: RankSpace, what: str, remedy: str) -> None:
    """Fail, naming the ranks and the setting to change, where stratified parts cannot be drawn.

    Stratified (group) k-fold needs at least one rank with `n_parts` images (scikit-learn's
    "n_splits=... cannot be greater than the number of members in each class"); smaller data sets
    than that must use fewer parts. `remedy` may use `{largest}`, the largest rank's count, and
    `{fraction}`, its inverse rounded up.
    """
    counts = np.bincount(ranks, minlength=len(rank_space))
    largest = int(counts.max(initial=0))
    if largest >= n_parts:
        return
    fraction = math.ceil(1000 / max(largest, 1)) / 1000
    listed = ", ".join(f"{rank_space.label_of(r)}: {c}" for r, c in enumerate(counts) if c)
    raise SplitError(
        f"{what} needs a rank with at least {n_parts} images, but every rank has fewer "
        f"(images per rank label: {listed}); {remedy.format(largest=largest, fraction=fraction)}"
        ", or add images"
    )


def _carve_calib(
    train: np.ndarray,
    ranks: np.ndarray,
    groups: np.ndarray,
    fraction: float,
    fold: int,
    rng: np.random.Generator,
    rank_space: RankSpace,
) -> tuple[np.ndarray, np.ndarray]:
    """Move one stratified, group-disjoint part of `train` (about `fraction`) to the calibration split.

    Separate from validation on purpose: validation picks the best epoch, so its scores are not
    exchangeable with test scores, which split conformal prediction needs. Carved before
    `shift_keep` / `few_shot` thin the training rows, so it keeps the fold's label distribution
    (like test). Its own generator, so that switching it on leaves validation unchanged.
    """
    return _carve_part(train, ranks, groups, fraction, rng, fold, rank_space, "calib_fraction", "calibration")


def _thin_train(train: np.ndarray, ranks: np.ndarray, config: SplitConfig, rng: np.random.Generator) -> np.ndarray:
    """Apply `shift_keep` or `few_shot` to the training rows; the dropped rows leave the fold.

    `shift_keep`: order the ranks present in train by their training count (most first, ties by
    rank index), take the first `shift_ranks` (default: half of them, rounded up) and keep a
    random `ceil(shift_keep * count)` of each one's training images. `few_shot`: keep a random
    `few_shot` training images per rank (all of a rank that has fewer). Validation and test are
    untouched, so they keep the original label distribution.
    """
    present, counts = np.unique(ranks[train], return_counts=True)
    if config.shift_keep is not None:
        order = np.lexsort((present, -counts))
        n_shift = config.shift_ranks or math.ceil(len(present) / 2)
        quota = dict(zip(present.tolist(), counts.tolist(), strict=True))
        for i in order[:n_shift]:
            # The epsilon keeps float noise (0.1 * 30 = 3.0000000000000004) from rounding up.
            quota[int(present[i])] = max(1, math.ceil(config.shift_keep * counts[i] - 1e-9))
    elif config.few_shot is not None:
        quota = {int(r): min(config.few_shot, int(c)) for r, c in zip(present, counts, strict=True)}
    else:
        return train
    kept = [rng.choice(train[ranks[train] == r], size=n, replace=False) for r, n in quota.items()]
    return np.sort(np.concatenate(kept))


def _check_ranks(fold: int, train_ranks: np.ndarray, rank_space: RankSpace, missing_ranks: str) -> None:
    """Fail (or warn) when a rank of the rank space has no training image in a fold."""
    absent = sorted(set(range(len(rank_space))) - set(train_ranks.tolist()))
    if not absent:
        return
    labels = ", ".join(str(rank_space.label_of(r)) for r in absent)
    message = f"fold {fold}: no training image for {len(absent)} rank(s), labels {labels} (rank indices {absent})"
    if missing_ranks == "error":
        raise SplitError(f"{message}; set split.missing_ranks: warn to train without them")
    log.warning("%s", message)
