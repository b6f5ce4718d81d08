"""The published split-list formats, on small fixtures of our own written in the same formats.

Each fixture copies a format's quirks (headers, CRLF endings, a missing final newline, a leading
index column, paths into another tree), never the authors' rows. The real lists are tested in
test_datalists.py.
"""

import hashlib
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from l2rclip.config import Params, from_dict
from l2rclip.data.sources import SourceError, load_source
from l2rclip.data.splits import make_splits, read_splits
from l2rclip.data.validate import validate_table
from l2rclip.ranks import RankSpace
from l2rclip.stages.prepare import prepare

A_HEADER = "race gender age filename database"


def write(path: Path, text: str, newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return path


def images(root: Path, names: list[str]) -> None:
    """A tiny image at every name, each of its own colour (identical files would be duplicates)."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        colour = tuple(hashlib.sha256(name.encode()).digest()[:3])  # far apart: JPEG keeps them distinct
        Image.new("RGB", (4, 4), colour).save(path, format="PNG" if name.endswith(".png") else "JPEG")


# --- MORPH ---------------------------------------------------------------------------------------


def morph_a(lists: Path) -> None:
    """Fold 0 space-separated with CRLF; fold 1 comma-separated with a leading index column."""
    write(
        lists / "Setting_A_fold0_train.txt",
        f"{A_HEADER}\n0 1 31 000001_0M31.JPG morph\n1 0 40 000002_1F40.JPG morph\n",
        "\r\n",
    )
    write(lists / "Setting_A_fold0_test.txt", f"{A_HEADER}\n0 1 22 000003_0M22.JPG morph\n", "\r\n")
    write(
        lists / "Setting_A_fold1_train.txt",
        ",race,gender,age,filename,database\n7,0,1,22,000003_0M22.JPG,morph\n2,1,0,40,000002_1F40.JPG,morph\n",
    )
    write(lists / "Setting_A_fold1_test.txt", ",race,gender,age,filename,database\n9,0,1,31,000001_0M31.JPG,morph")


def test_morph_setting_a_reads_both_table_formats(tmp_path):
    morph_a(tmp_path / "settingA")
    images(tmp_path / "img" / "nested", ["000001_0M31.JPG", "000002_1F40.JPG", "000003_0M22.JPG"])
    table = load_source("morph", tmp_path / "img", tmp_path / "settingA")
    assert list(table.columns) == ["path", "label", "group", "fold", "split", "race", "gender"]
    assert table[["fold", "split"]].value_counts().sort_index().to_dict() == {
        (0, "test"): 1,
        (0, "train"): 2,
        (1, "test"): 1,
        (1, "train"): 2,
    }
    first = table.iloc[0].to_dict()
    assert first == {
        "path": "nested/000001_0M31.JPG",
        "label": 31,
        "group": "000001",
        "fold": 0,
        "split": "train",
        "race": 0,
        "gender": 1,
    }
    assert table.loc[table["fold"] == 1, "label"].tolist() == [22, 40, 31]


def test_morph_setting_a_fold_without_its_test_list_fails(tmp_path):
    write(tmp_path / "Setting_A_fold3_train.txt", f"{A_HEADER}\n0 1 31 000001_0M31.JPG morph\n")
    with pytest.raises(
        SourceError, match="setting A fold 3: expected Setting_A_fold3_train.txt and Setting_A_fold3_test.txt"
    ):
        load_source("morph", tmp_path, tmp_path)


def test_morph_setting_b_trains_on_one_subset_and_tests_on_the_others(tmp_path):
    for k in range(3):
        write(
            tmp_path / "settingB" / f"Setting_B_fold{k}.txt",
            f"{A_HEADER}\n" + "".join(f"1 0 {20 + k} 00{k}00{i}_0M{20 + k}.JPG morph\n" for i in range(k + 1)),
            "\r\n",
        )
    table = load_source("morph", tmp_path, tmp_path / "settingB")
    assert len(table) == 3 * 6  # 6 images, each in all three folds
    for fold in range(3):
        rows = table[table["fold"] == fold]
        assert set(rows.loc[rows["split"] == "train", "label"]) == {20 + fold}
        assert len(rows[rows["split"] == "train"]) == fold + 1
        assert set(rows.loc[rows["split"] == "test", "label"]) == {20, 21, 22} - {20 + fold}
    assert set(table["race"]) == {1} and set(table["gender"]) == {0}


@pytest.mark.parametrize("setting", ["C", "D"])
def test_morph_settings_c_d_resolve_foreign_paths_by_file_name(tmp_path, setting):
    lists = tmp_path / f"setting{setting}"
    write(
        lists / f"morph_{setting}_00.txt",
        "../../datasets/Morph/image/000001_0M31.JPG 31\n../../datasets/Morph/image/000002_1F40.JPG 40\n",
    )
    write(lists / f"morph_{setting}_01.txt", "../../datasets/Morph/image/000003_0M22.JPG 22")
    images(tmp_path / "root" / "Album2", ["000001_0M31.JPG", "000003_0M22.JPG"])
    table = load_source("morph", tmp_path / "root", lists)
    assert list(table.itertuples(index=False, name=None)) == [
        ("Album2/000001_0M31.JPG", 31, "000001", 0),
        ("000002_1F40.JPG", 40, "000002", 0),
        ("Album2/000003_0M22.JPG", 22, "000003", 1),
    ]
    ranks = RankSpace(list(range(16, 78)))
    good, report = validate_table(table, tmp_path / "root", ranks)
    assert report[["path", "reason"]].values.tolist() == [["000002_1F40.JPG", "missing_file"]]
    config = from_dict(Params, {"split": {"protocol": "given", "val_fraction": 0, "missing_ranks": "warn"}}).split
    splits = make_splits(good, config, 0, ranks)
    tests = splits[splits["split"] == "test"]
    assert tests.groupby("fold")["path"].apply(list).to_dict() == {
        0: ["Album2/000001_0M31.JPG"],
        1: ["Album2/000003_0M22.JPG"],
    }


def test_morph_folder_with_two_settings_fails(tmp_path):
    write(tmp_path / "morph_C_00.txt", "a/000001_0M31.JPG 31\n")
    write(tmp_path / "morph_D_00.txt", "a/000001_0M31.JPG 31\n")
    with pytest.raises(SourceError, match="one MORPH setting, found settings C, D"):
        load_source("morph", tmp_path, tmp_path)


# --- Adience -------------------------------------------------------------------------------------


def test_adience_simplified_lists_give_folds_groups_and_group_indices(tmp_path):
    for k in range(5):
        write(
            tmp_path / "lists" / f"simplified_adience_{k}.txt",
            f"u{k}@N0{k}/landmark_aligned_face.{k}.ab{k}_o.jpg {k}\n"
            f"shared@N00/landmark_aligned_face.9.c{k}_o.jpg 7\n",
        )
    images(tmp_path / "aligned", ["u0@N00/landmark_aligned_face.0.ab0_o.jpg"])
    table = load_source("adience", tmp_path / "aligned", tmp_path / "lists")
    assert len(table) == 10 and table["fold"].value_counts().to_dict() == {k: 2 for k in range(5)}
    assert table.iloc[0].to_dict() == {
        "path": "u0@N00/landmark_aligned_face.0.ab0_o.jpg",
        "label": 0,
        "group": "u0@N00",
        "fold": 0,
    }
    assert table["label"].tolist() == [0, 7, 1, 7, 2, 7, 3, 7, 4, 7]
    assert table.loc[1, "path"] == "shared@N00/landmark_aligned_face.9.c0_o.jpg"  # missing: listed path kept


def test_adience_simplified_needs_all_five_lists(tmp_path):
    write(tmp_path / "simplified_adience_0.txt", "u/landmark_aligned_face.1.a.jpg 3\n")
    with pytest.raises(SourceError, match="expected the 5 lists simplified_adience_0.txt"):
        load_source("adience", tmp_path, tmp_path)


# --- HCI -----------------------------------------------------------------------------------------


def hci_names(per_decade: int) -> dict[int, list[str]]:
    return {d: [f"images/{d}s_decade_{d}{i:04x}.jpg" for i in range(per_decade)] for d in range(1930, 1980, 10)}


def test_hci_per_decade_lists_and_the_flat_folder_agree(tmp_path):
    names = hci_names(3)
    for d, listed in names.items():
        write(tmp_path / "lists" / f"{d}s.txt", "".join(f"./{n} {d}s\n" for n in listed))
    images(tmp_path / "root", [n for listed in names.values() for n in listed])
    from_lists = load_source("hci", tmp_path / "root", tmp_path / "lists")
    flat = load_source("hci", tmp_path / "root")
    assert len(from_lists) == 15 and from_lists["label"].value_counts().to_dict() == {d: 3 for d in names}
    assert from_lists.loc[0, "path"] == "images/1930s_decade_19300000.jpg"
    pd.testing.assert_frame_equal(
        from_lists.sort_values("path").reset_index(drop=True), flat.sort_values("path").reset_index(drop=True)
    )


def test_hci_lists_run_the_repeats_protocol(tmp_path):
    names = hci_names(6)
    for d, listed in names.items():
        write(tmp_path / "lists" / f"{d}s.txt", "".join(f"./{n} {d}s\n" for n in listed))
    images(tmp_path, [n for listed in names.values() for n in listed])
    params = from_dict(
        Params,
        {
            "folds": [0, 1, 2],
            "ranks": {"start": 1930, "stop": 1970, "labels": [1930, 1940, 1950, 1960, 1970]},
            "split": {"protocol": "repeats", "n_repeats": 3, "n_train": 3, "n_val": 1, "n_test": 2},
        },
    )
    ranks = RankSpace.from_config(params.ranks)
    good, report = validate_table(load_source("hci", tmp_path, tmp_path / "lists"), tmp_path, ranks)
    assert report.empty
    splits = make_splits(good, params.split, 0, ranks)
    sizes = splits.groupby(["fold", "split"]).size().to_dict()
    assert sizes == {(f, s): n * 5 for f in range(3) for s, n in (("train", 3), ("val", 1), ("test", 2))}


# --- CrowdBeauty ---------------------------------------------------------------------------------


def crowdbeauty(folder: Path) -> None:
    write(folder / "animals_train.txt", "11.png\t3.0\n12.png\t4.5\n13.png\t1.0")
    write(folder / "animals_test.txt", "14.png\t5.0\n")
    write(folder / "animals_datasets.txt", "11.png\t3.0\n12.png\t4.5\n13.png\t1.0\n14.png\t5.0\n")
    write(folder / "urban_train.txt", "21.png\t2.0\n")
    write(folder / "urban_test.txt", "22.png\t2.4\n")


def test_crowdbeauty_lists_give_split_category_and_levels(tmp_path):
    crowdbeauty(tmp_path / "lists")
    table = load_source("aesthetics", tmp_path, tmp_path / "lists")
    assert list(table.itertuples(index=False, name=None)) == [
        ("11.png", 3, None, "train", "animals"),
        ("12.png", 5, None, "train", "animals"),
        ("13.png", 1, None, "train", "animals"),
        ("14.png", 5, None, "test", "animals"),
        ("21.png", 2, None, "train", "urban"),
        ("22.png", 2, None, "test", "urban"),
    ]
    urban = load_source("aesthetics", tmp_path, tmp_path / "lists", category="urban")
    assert urban["path"].tolist() == ["21.png", "22.png"]
    with pytest.raises(SourceError, match="data.category 'people' not found; categories found: animals, urban"):
        load_source("aesthetics", tmp_path, tmp_path / "lists", category="people")


def test_crowdbeauty_category_without_test_list_fails(tmp_path):
    write(tmp_path / "nature_train.txt", "1.png\t3.0\n")
    with pytest.raises(SourceError, match="incomplete: nature"):
        load_source("aesthetics", tmp_path, tmp_path)


# --- CLAP2015 ------------------------------------------------------------------------------------


def test_clap2015_total_list_splits_from_database_and_keeps_stdv(tmp_path):
    write(
        tmp_path / "total_2015.csv",
        "filename,age,stdv,database\nimage_1.jpg,21,4.5,train\nimage_2.jpg,30,2.25,val\nimage_3.jpg,58,6,test\n",
        "\r\n",
    )
    images(tmp_path / "root", ["train/image_1.jpg", "valid/image_2.jpg"])
    for list_file in (tmp_path / "total_2015.csv", tmp_path):
        table = load_source("clap2015", tmp_path / "root", list_file)
        assert list(table.itertuples(index=False, name=None)) == [
            ("train/image_1.jpg", 21, None, "train", 4.5),
            ("valid/image_2.jpg", 30, None, "val", 2.25),
            ("image_3.jpg", 58, None, "test", 6.0),
        ]


def test_clap2015_total_list_with_an_unknown_database_fails(tmp_path):
    write(tmp_path / "total_2015.csv", "filename,age,stdv,database\nimage_1.jpg,21,4.5,holdout\n")
    with pytest.raises(SourceError, match="data row 1: expected a split in .*found 'holdout'"):
        load_source("clap2015", tmp_path, tmp_path / "total_2015.csv")


# --- through the prepare stage -------------------------------------------------------------------


def test_prepare_keeps_extra_columns_and_reports_missing_list_images(tmp_path):
    morph_a(tmp_path / "settingA")
    images(tmp_path / "img", ["000001_0M31.JPG", "000003_0M22.JPG"])  # 000002 is missing
    params = from_dict(
        Params,
        {
            "ranks": {"start": 16, "stop": 77},
            "data": {"source": "morph", "root": str(tmp_path / "img"), "list_file": str(tmp_path / "settingA")},
            "split": {"protocol": "given", "val_fraction": 0, "missing_ranks": "warn"},
        },
    )
    summary = prepare(params, tmp_path / "out")
    bad = pd.read_csv(tmp_path / "out" / "bad_rows.csv")
    assert bad["reason"].tolist() == ["missing_file", "missing_file"]
    assert set(bad["path"]) == {"000002_1F40.JPG"} and summary["rows"] == {"total": 6, "good": 4, "bad": 2}
    kept = pd.read_csv(tmp_path / "out" / "images.csv")
    assert {"race", "gender"} <= set(kept.columns)
    splits = read_splits(tmp_path / "out" / "splits.csv")
    assert {"race", "gender"} <= set(splits.columns)
    assert splits.loc[splits["path"] == "000001_0M31.JPG", "gender"].tolist() == [1, 1]


def test_prepare_carries_category_and_stdv(tmp_path):
    crowdbeauty(tmp_path / "lists")
    images(tmp_path / "root", ["11.png", "12.png", "13.png", "14.png", "21.png", "22.png"])
    params = from_dict(
        Params,
        {
            "ranks": {"start": 1, "stop": 5},
            "data": {
                "source": "aesthetics",
                "root": str(tmp_path / "root"),
                "list_file": str(tmp_path / "lists"),
                "category": "animals",
            },
            "split": {"protocol": "given", "val_fraction": 0, "missing_ranks": "warn"},
        },
    )
    prepare(params, tmp_path / "out")
    splits = read_splits(tmp_path / "out" / "splits.csv")
    assert set(splits["category"]) == {"animals"} and len(splits) == 4


def test_category_for_a_source_without_categories_is_an_error(tmp_path):
    params = from_dict(Params, {"data": {"source": "hci", "root": str(tmp_path), "category": "animals"}})
    with pytest.raises(SourceError, match="data.category .* selects an aesthetics category; source 'hci'"):
        prepare(params, tmp_path / "out")
