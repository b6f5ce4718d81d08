"""Splits: group-disjoint folds, validation from train only, every protocol, clear errors."""

import logging

import numpy as np
import pandas as pd
import pytest

from l2rclip.config import SplitConfig
from l2rclip.data.splits import SplitError, make_splits, read_splits, select
from l2rclip.ranks import RankSpace

RANKS = RankSpace(range(1, 6))


def grouped_table(n_groups: int = 30, per_group: int = 4, seed: int = 0) -> pd.DataFrame:
    """Subjects with several images each; every rank has images from many subjects."""
    rng = np.random.default_rng(seed)
    ranks = rng.integers(0, 5, n_groups * per_group)
    ranks[:5] = range(5)
    return pd.DataFrame(
        {
            "path": [f"img{i:04d}.png" for i in range(len(ranks))],
            "group": [f"s{i // per_group:03d}" for i in range(len(ranks))],
            "label": ranks + 1,
            "rank": ranks,
            "value": ranks + 1.0,
        }
    )


def ungrouped(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(group=None)


def assert_group_disjoint(splits: pd.DataFrame) -> None:
    for fold, rows in splits.groupby("fold"):
        sides = rows.groupby("group")["split"].nunique()
        assert (sides == 1).all(), f"fold {fold}: groups on two sides: {list(sides[sides > 1].index)}"


def test_kfold_grouped_is_disjoint_and_tests_every_image_once():
    table = grouped_table()
    splits = make_splits(table, SplitConfig(n_folds=5, val_fraction=0.2), seed=0, rank_space=RANKS)
    assert_group_disjoint(splits)
    tests = splits[splits["split"] == "test"]
    assert sorted(tests["path"]) == sorted(table["path"])
    for _fold, rows in splits.groupby("fold"):
        assert rows["path"].is_unique  # val and train never overlap, nor with test
        assert len(rows) == len(table)
        assert rows["split"].value_counts()["val"] == pytest.approx(
            0.2 * (rows["split"] != "test").sum(), rel=0.35
        )
    assert list(splits.columns) == ["fold", "split", "path", "group", "label", "rank", "value"]


def test_splits_are_deterministic_from_the_seed():
    table = grouped_table()
    first = make_splits(table, SplitConfig(), seed=3, rank_space=RANKS)
    pd.testing.assert_frame_equal(first, make_splits(table, SplitConfig(), seed=3, rank_space=RANKS))
    assert not first.equals(make_splits(table, SplitConfig(), seed=4, rank_space=RANKS))


def test_kfold_without_groups_uses_single_images():
    table = ungrouped(grouped_table())
    splits = make_splits(table, SplitConfig(n_folds=4), seed=0, rank_space=RANKS)
    assert splits["fold"].nunique() == 4
    assert sorted(splits.loc[splits["split"] == "test", "path"]) == sorted(table["path"])


def test_logo_has_one_fold_per_group():
    table = grouped_table(n_groups=12)
    splits = make_splits(table, SplitConfig(protocol="logo", val_fraction=0.2), seed=0, rank_space=RANKS)
    assert splits["fold"].nunique() == 12
    assert (splits[splits["split"] == "test"].groupby("fold")["group"].nunique() == 1).all()
    assert_group_disjoint(splits)
    with pytest.raises(SplitError, match="needs a group on every row"):
        make_splits(ungrouped(table), SplitConfig(protocol="logo"), seed=0, rank_space=RANKS)


def test_given_folds_splits_and_fold_lists():
    table = grouped_table()  # 120 images of 30 subjects
    by_fold = table.assign(fold=table.index // 40 * 7)  # ids 0, 7, 14 -> folds 0, 1, 2
    splits = make_splits(by_fold, SplitConfig(protocol="given"), seed=0, rank_space=RANKS)
    assert splits["fold"].unique().tolist() == [0, 1, 2]
    assert select(splits, 1, "test")["path"].tolist() == table["path"][40:80].tolist()
    assert_group_disjoint(splits)
    by_split = table.assign(split=np.where(table.index < 60, "train", "test"))
    splits = make_splits(by_split, SplitConfig(protocol="given"), seed=0, rank_space=RANKS)
    assert set(select(splits, 0, "val")["path"]) <= set(table["path"][:60])
    fold_list = pd.concat(
        [
            table.assign(fold=f, split=np.roll(np.repeat(["train", "val", "test"], [80, 20, 20]), 40 * f))
            for f in range(2)
        ],
        ignore_index=True,
    )
    splits = make_splits(fold_list, SplitConfig(protocol="given"), seed=0, rank_space=RANKS)
    assert (
        splits.groupby(["fold", "split"]).size().unstack()[["train", "val", "test"]].values.tolist()
        == [[80, 20, 20]] * 2
    )
    assert select(splits, 1, "val")["path"].tolist() == table["path"][:20].tolist()


def test_given_needs_a_fold_or_split_column():
    with pytest.raises(SplitError, match="needs a fold or split column"):
        make_splits(grouped_table(), SplitConfig(protocol="given"), seed=0, rank_space=RANKS)


def test_repeats_draws_fixed_counts_per_rank():
    table = ungrouped(grouped_table(n_groups=100))
    config = SplitConfig(protocol="repeats", n_repeats=3, n_train=10, n_val=2, n_test=5)
    splits = make_splits(table, config, seed=0, rank_space=RANKS)
    counts = splits.groupby(["fold", "split", "rank"]).size().unstack("split")
    assert (counts[["train", "val", "test"]] == [10, 2, 5]).all().all()
    assert splits.groupby("fold")["path"].apply(lambda p: p.is_unique).all()
    assert not select(splits, 0, "test")["path"].equals(select(splits, 1, "test")["path"])
    with pytest.raises(SplitError, match="needs n_train \\+ n_val \\+ n_test = 1017 images per rank"):
        make_splits(
            table, SplitConfig(protocol="repeats", n_train=1000, n_val=12, n_test=5), seed=0, rank_space=RANKS
        )
    with pytest.raises(SplitError, match="use kfold or logo for grouped data"):
        make_splits(grouped_table(), config, seed=0, rank_space=RANKS)


def test_few_shot_keeps_k_per_rank_and_leaves_val_and_test_alone():
    table = grouped_table()
    full = make_splits(table, SplitConfig(), seed=0, rank_space=RANKS)
    few = make_splits(table, SplitConfig(few_shot=2), seed=0, rank_space=RANKS)
    assert (select(few, 0, "train")["rank"].value_counts() == 2).all()
    assert set(select(few, 0, "train")["path"]) < set(select(full, 0, "train")["path"])
    for split in ("val", "test"):
        pd.testing.assert_frame_equal(select(few, 0, split), select(full, 0, split))


def test_shift_thins_the_most_frequent_training_ranks():
    table = grouped_table()
    config = SplitConfig(shift_keep=0.25, shift_ranks=2)
    full = select(make_splits(table, SplitConfig(), seed=0, rank_space=RANKS), 0, "train")
    shifted = select(make_splits(table, config, seed=0, rank_space=RANKS), 0, "train")
    before = full["rank"].value_counts()
    after = shifted["rank"].value_counts().reindex(before.index)
    top = before.sort_values(ascending=False, kind="stable").index[:2]
    assert (after[top] == np.ceil(before[top] * 0.25)).all()
    rest = before.index.difference(top)
    assert (after[rest] == before[rest]).all()


def test_too_few_groups_empty_split_and_missing_ranks_are_clear_errors(caplog):
    table = grouped_table(n_groups=3, per_group=10)
    with pytest.raises(SplitError, match="5 folds need at least 5 groups \\(subjects\\), found 3"):
        make_splits(table, SplitConfig(n_folds=5), seed=0, rank_space=RANKS)
    with pytest.raises(SplitError, match="training part has 2 groups/images, too few"):
        make_splits(table, SplitConfig(n_folds=3, val_fraction=0.1), seed=0, rank_space=RANKS)
    no_test = grouped_table().assign(split="train")
    with pytest.raises(SplitError, match="fold 0: the test split is empty"):
        make_splits(no_test, SplitConfig(protocol="given"), seed=0, rank_space=RANKS)
    rare = grouped_table()
    rare = pd.concat([rare[rare["rank"] != 4], rare[rare["rank"] == 4].head(1)])
    with pytest.raises(SplitError, match=r"fold \d: no training image for 1 rank\(s\), labels 5"):
        make_splits(rare, SplitConfig(n_folds=3), seed=0, rank_space=RANKS)
    with caplog.at_level(logging.WARNING):
        make_splits(rare, SplitConfig(n_folds=3, missing_ranks="warn"), seed=0, rank_space=RANKS)
    assert "labels 5" in caplog.text


def test_contradictory_options_are_rejected():
    with pytest.raises(SplitError, match="choose one"):
        make_splits(grouped_table(), SplitConfig(few_shot=2, shift_keep=0.5), seed=0, rank_space=RANKS)
    with pytest.raises(SplitError, match=r"'split.val_fraction': expected a value in \[0, 0.5\], found 0.9"):
        make_splits(grouped_table(), SplitConfig(val_fraction=0.9), seed=0, rank_space=RANKS)
    listed_twice = pd.concat([grouped_table()] * 2, ignore_index=True)
    with pytest.raises(SplitError, match="lists some more than once .*use protocol given"):
        make_splits(listed_twice, SplitConfig(), seed=0, rank_space=RANKS)


def test_select_and_read_splits_round_trip(tmp_path):
    splits = make_splits(grouped_table(), SplitConfig(), seed=0, rank_space=RANKS)
    splits.to_csv(tmp_path / "splits.csv", index=False)
    again = read_splits(tmp_path / "splits.csv")
    pd.testing.assert_frame_equal(select(again, 2, "val"), select(splits, 2, "val"), check_dtype=False)
    with pytest.raises(SplitError, match="no rows for fold 9"):
        select(splits, 9, "train")
