"""The promotion holdout: stable under added data, whole groups, never in any fold."""

import numpy as np
import pandas as pd

from l2rclip.config import Params, from_dict
from l2rclip.data.demo import generate_demo
from l2rclip.data.holdout import holdout_mask, holdout_spec, holdout_version, split_holdout
from l2rclip.data.splits import read_splits
from l2rclip.stages.prepare import prepare


def table(n: int, groups: bool = True) -> pd.DataFrame:
    rows = {"path": [f"img_{i:04d}.png" for i in range(n)], "label": [i % 5 for i in range(n)]}
    if groups:
        rows["group"] = [f"person{i // 4}" for i in range(n)]  # four images per person
    return pd.DataFrame(rows)


def test_membership_depends_on_the_group_only_not_on_other_rows_or_their_order():
    small, large = table(400), table(1200)
    before = dict(zip(small["path"], holdout_mask(small, 0.2, "s"), strict=True))
    shuffled = large.sample(frac=1.0, random_state=3)
    after = dict(zip(shuffled["path"], holdout_mask(shuffled, 0.2, "s"), strict=True))
    assert all(after[path] == member for path, member in before.items())
    members = large[holdout_mask(large, 0.2, "s")]
    assert (large[large["group"].isin(members["group"])]["path"].isin(members["path"])).all()  # whole groups
    held_groups, sd = members["group"].nunique(), (300 * 0.2 * 0.8) ** 0.5
    assert abs(held_groups - 60) < 4 * sd  # 300 groups, each in with probability 0.2 (binomial, 4 sd)
    assert not holdout_mask(large, 0.0, "s").any()
    assert not np.array_equal(holdout_mask(large, 0.2, "s"), holdout_mask(large, 0.2, "t"))  # salt redefines


def test_rows_without_groups_hash_by_path_and_the_version_names_the_set():
    rows = table(300, groups=False)
    folded, held = split_holdout(rows, 0.1, "s")
    assert len(folded) + len(held) == 300 and not set(folded["path"]) & set(held["path"])
    assert holdout_version(held) == holdout_version(held.iloc[::-1]) != holdout_version(held.iloc[1:])
    assert holdout_spec(0.1, "s") == "fraction=0.1;salt=s"


def params(root, fraction: float) -> Params:
    return from_dict(
        Params,
        {
            "folds": [0, 1],
            "ranks": {"start": 1, "stop": 10},
            "data": {"source": "csv", "root": str(root)},
            "split": {"n_folds": 2, "val_fraction": 0.25, "holdout_fraction": fraction},
        },
    )


def test_added_images_never_move_an_old_gate_image_into_training(tmp_path):
    root = tmp_path / "images"
    images = generate_demo(root, n_per_rank=30, image_size=48)
    old = images.groupby("label").head(20)  # the data as it was; then more images of every rank arrive
    old[["path", "label", "group"]].to_csv(root / "labels.csv", index=False)
    prepare(params(root, 0.2), tmp_path / "before")
    gate_before = pd.read_csv(tmp_path / "before/holdout.csv")
    assert len(gate_before) > 0

    images[["path", "label", "group"]].to_csv(root / "labels.csv", index=False)
    summary = prepare(params(root, 0.2), tmp_path / "after")
    gate_after = pd.read_csv(tmp_path / "after/holdout.csv")
    splits = read_splits(tmp_path / "after/splits.csv")
    assert set(gate_before["path"]) <= set(gate_after["path"])  # old gate images stay in the gate
    assert not set(gate_after["path"]) & set(splits["path"])  # and the gate is in no fold's train/val/test
    assert not set(gate_after["path"]) - set(gate_before["path"]) & set(old["path"])  # no old image joins it
    assert summary["holdout"] == {
        "images": len(gate_after),
        "spec": "fraction=0.2;salt=l2rclip-gate",
        "version": holdout_version(gate_after),
    }


def test_no_holdout_leaves_the_published_protocol_untouched(tmp_path):
    root = tmp_path / "images"
    generate_demo(root, n_per_rank=10, image_size=48)[["path", "label", "group"]].to_csv(
        root / "labels.csv", index=False
    )
    prepare(params(root, 0.0), tmp_path / "out")
    assert pd.read_csv(tmp_path / "out/holdout.csv").empty
    assert read_splits(tmp_path / "out/splits.csv").query("split == 'test'")["path"].nunique() == 100
