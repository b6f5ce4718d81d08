import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from l2rclip.data.sources import ADIENCE_GROUPS, SOURCES, SourceError, load_source

EXPECTED_SOURCES = {
    "csv",
    "folder",
    "fgnet",
    "utkface",
    "morph",
    "adience",
    "hci",
    "aesthetics",
    "clap2015",
    "demo",
}


def image(path: Path) -> Path:
    """A tiny real image at `path`: JPEG for .jpg/.jpeg, else PNG (sources never open them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    jpeg = path.suffix.lower() in {".jpg", ".jpeg"}
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path, format="JPEG" if jpeg else "PNG")
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def rows(table: pd.DataFrame) -> list[tuple]:
    return list(table.itertuples(index=False, name=None))


# --- registry -------------------------------------------------------------------------------------


def test_registry_names_every_adapter():
    assert set(SOURCES) == EXPECTED_SOURCES


def test_unknown_source_lists_the_known_ones(tmp_path):
    with pytest.raises(SourceError, match="unknown source 'imagenet'.*adience.*utkface"):
        load_source("imagenet", tmp_path)


def test_unknown_option_names_the_accepted_ones(tmp_path):
    with pytest.raises(SourceError, match="unknown option.*size.*n_per_rank, image_size, seed"):
        load_source("demo", tmp_path, size=3)
    with pytest.raises(SourceError, match="'csv': unknown option.*no options"):
        load_source("csv", tmp_path, seed=1)


def test_relative_list_file_is_found_under_root(tmp_path):
    write(tmp_path / "lists" / "mine.csv", "path,label\na.png,3\n")
    assert rows(load_source("csv", tmp_path, "lists/mine.csv")) == [("a.png", 3, None)]


# --- csv ------------------------------------------------------------------------------------------


def test_csv_reads_all_columns_in_file_order(tmp_path):
    write(
        tmp_path / "labels.csv",
        "label,path,group,fold,split,extra\n"
        '7,b/x.jpg,p1,0,train,z\n3,/abs/y.png, ,1,Valid,z\n"(25, 32)",c.png,p2,1,test,z\n',
    )
    table = load_source("csv", tmp_path)
    assert list(table.columns) == ["path", "label", "group", "fold", "split"]
    assert rows(table) == [
        ("b/x.jpg", 7, "p1", 0, "train"),
        ("/abs/y.png", 3, None, 1, "val"),
        ("c.png", "(25, 32)", "p2", 1, "test"),
    ]
    assert table["fold"].dtype == np.int64


def test_csv_integer_labels_give_an_int_column_and_no_fold_or_split(tmp_path):
    table = load_source("csv", tmp_path, write(tmp_path / "l.csv", "path,label\na.png,01\nb.png,12\n"))
    assert list(table.columns) == ["path", "label", "group"]
    assert table["label"].dtype == np.int64 and table["label"].tolist() == [1, 12]
    assert table["group"].isna().all()


def test_csv_wrong_column_names_file_expected_and_found(tmp_path):
    bad = write(tmp_path / "bad.csv", "file,age\na.png,3\n")
    with pytest.raises(SourceError) as error:
        load_source("csv", tmp_path, bad)
    message = str(error.value)
    assert str(bad) in message and "expected columns path, label" in message and "found file, age" in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path,label\n", "no rows"),
        ("path,label,fold\na.png,1,x\n", "integer fold id"),
        ("path,label,split\na.png,1,dev\n", "expected a split"),
    ],
)
def test_csv_structural_problems(tmp_path, text, message):
    write(tmp_path / "labels.csv", text)
    with pytest.raises(SourceError, match=message):
        load_source("csv", tmp_path)


def test_csv_missing_root_or_file_says_where(tmp_path):
    with pytest.raises(SourceError, match=f"expected a directory at {tmp_path / 'nope'}"):
        load_source("csv", tmp_path / "nope")
    with pytest.raises(SourceError, match=f"expected a file at {tmp_path / 'labels.csv'}"):
        load_source("csv", tmp_path)


# --- folder and hci ---------------------------------------------------------------------------


def test_folder_labels_are_folder_names(tmp_path):
    for name in ("3/a.JPG", "3/sub/b.png", "10/c.jpeg", "old/d.WebP", "3/.hidden.jpg", ".cache/e.jpg"):
        image(tmp_path / name)
    write(tmp_path / "3" / "notes.txt", "not an image")
    image(tmp_path / "stray.png")
    # notes.txt is listed so that validation reports it (unsupported_extension) rather than it vanishing
    assert rows(load_source("folder", tmp_path)) == [
        ("10/c.jpeg", 10, None),
        ("3/a.JPG", 3, None),
        ("3/notes.txt", 3, None),
        ("3/sub/b.png", 3, None),
        ("old/d.WebP", "old", None),
    ]


def test_folder_without_images_or_with_a_list_file_fails(tmp_path):
    (tmp_path / "1").mkdir()
    with pytest.raises(SourceError, match="no images"):
        load_source("folder", tmp_path)
    with pytest.raises(SourceError, match="takes no list file"):
        load_source("folder", tmp_path, tmp_path / "x.csv")


def test_hci_decades_become_ints(tmp_path):
    for name in ("1930s/a.jpg", "1970s/b.jpg", "1970s/c.jpg", "misc/d.jpg"):
        image(tmp_path / name)
    assert rows(load_source("hci", tmp_path)) == [
        ("1930s/a.jpg", 1930, None),
        ("1970s/b.jpg", 1970, None),
        ("1970s/c.jpg", 1970, None),
        ("misc/d.jpg", "misc", None),
    ]


# --- fgnet and utkface --------------------------------------------------------------------------


def test_fgnet_from_labels_csv_keeps_subject_ids_as_text(tmp_path):
    write(tmp_path / "labels.csv", "filename,subject_id,age\n002A22a.JPG,002,22\n001A02.JPG,001,2\n")
    assert rows(load_source("fgnet", tmp_path)) == [("002A22a.JPG", 22, "002"), ("001A02.JPG", 2, "001")]


def test_fgnet_from_file_names(tmp_path):
    for name in ("001A02.JPG", "001A22a.JPG", "010a05.jpg", "odd.jpg"):
        image(tmp_path / "images" / name)
    assert rows(load_source("fgnet", tmp_path)) == [
        ("images/001A02.JPG", 2, "001"),
        ("images/001A22a.JPG", 22, "001"),
        ("images/010a05.jpg", 5, "010"),
        ("images/odd.jpg", "odd.jpg", None),
    ]


def test_fgnet_labels_csv_with_wrong_columns_fails(tmp_path):
    write(tmp_path / "labels.csv", "filename,age\n001A02.JPG,2\n")
    with pytest.raises(SourceError, match="labels.csv: expected columns filename, age, subject_id"):
        load_source("fgnet", tmp_path)


def test_utkface_from_labels_csv_and_from_names(tmp_path):
    names = ("100_1_0_20170110183726390.jpg.chip.jpg", "61_1_20170109142408075.jpg.chip.jpg", "x_0_0.jpg")
    for name in names:
        image(tmp_path / "images" / name)
    assert rows(load_source("utkface", tmp_path)) == [
        (f"images/{names[0]}", 100, None),
        (f"images/{names[1]}", 61, None),
        (f"images/{names[2]}", names[2], None),
    ]
    write(tmp_path / "labels.csv", f"filename,age,gender,race\n{names[1]},61,,\n")
    assert rows(load_source("utkface", tmp_path)) == [(f"images/{names[1]}", 61, None)]


def test_empty_image_folder_fails(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(SourceError, match="expected image files"):
        load_source("utkface", tmp_path)


@pytest.mark.data
def test_real_fgnet_table(shared_data, tmp_path):
    table = load_source("fgnet", shared_data / "fgnet")
    assert len(table) == 1002 and table["group"].nunique() == 82
    assert table["label"].dtype == np.int64 and (table["label"].min(), table["label"].max()) == (0, 69)
    assert (shared_data / "fgnet" / table["path"].iloc[0]).is_file()
    # Without labels.csv the file names give the same table (as a set: they come back sorted).
    os.symlink(shared_data / "fgnet" / "images", tmp_path / "images")
    parsed = load_source("fgnet", tmp_path)
    assert sorted(rows(parsed)) == sorted(rows(table))


@pytest.mark.data
def test_real_utkface_table(shared_data, tmp_path):
    table = load_source("utkface", shared_data / "utkface-part1")
    assert len(table) == 9780 and table["path"].is_unique and table["group"].isna().all()
    assert (table["label"].min(), table["label"].max()) == (1, 110)
    os.symlink(shared_data / "utkface-part1" / "images", tmp_path / "images")
    assert sorted(rows(load_source("utkface", tmp_path))) == sorted(rows(table))


# --- morph ----------------------------------------------------------------------------------------


def test_morph_single_list(tmp_path):
    write(tmp_path / "setting_a.txt", "# MORPH list\nalbum2/001234_1M45.JPG 45\n\nmy dir/b.jpg\t30\nc.jpg\n")
    assert rows(load_source("morph", tmp_path, tmp_path / "setting_a.txt")) == [
        ("album2/001234_1M45.JPG", 45, "001234"),
        ("my dir/b.jpg", 30, None),
        ("c.jpg", "", None),
    ]


def test_morph_split_directory(tmp_path):
    write(tmp_path / "lists" / "train.txt", "a.jpg 20\nb.jpg 21\n")
    write(tmp_path / "lists" / "test.txt", "c.jpg 40\n")
    write(tmp_path / "lists" / "val.txt", "d.jpg 50\n")
    write(tmp_path / "lists" / "README.md", "ignored")
    table = load_source("morph", tmp_path, tmp_path / "lists")
    assert list(table.columns) == ["path", "label", "group", "split"]
    assert table[["path", "split"]].values.tolist() == [
        ["a.jpg", "train"],
        ["b.jpg", "train"],
        ["d.jpg", "val"],
        ["c.jpg", "test"],
    ]


def test_morph_fold_directory_repeats_images_per_fold(tmp_path):
    for fold in (1, 0):
        write(tmp_path / f"fold{fold}_train.txt", f"{'ab'[fold]}.jpg 20\n")
        write(tmp_path / f"fold{fold}_test.txt", f"{'ba'[fold]}.jpg 30\n")
    table = load_source("morph", tmp_path, tmp_path)
    assert table[["path", "fold", "split"]].values.tolist() == [
        ["a.jpg", 0, "train"],
        ["b.jpg", 0, "test"],
        ["b.jpg", 1, "train"],
        ["a.jpg", 1, "test"],
    ]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"train.txt": "a.jpg 3\n"}, "expected one train and one test list"),
        ({"fold0_train.txt": "a.jpg 3\n", "fold0_test.txt": "b.jpg 3\n", "test.txt": "c.jpg 3\n"}, "mixes"),
        ({"notes.txt": ""}, "expected split lists .*found notes.txt"),
        ({"train.txt": "a.jpg 3\n", "test.txt": "# nothing\n"}, "test.txt: expected lines"),
    ],
)
def test_morph_bad_list_directories(tmp_path, files, message):
    for name, text in files.items():
        write(tmp_path / "lists" / name, text)
    with pytest.raises(SourceError, match=message):
        load_source("morph", tmp_path, tmp_path / "lists")


def test_morph_file_names_without_a_list(tmp_path):
    for name in ("album2/012345_1M45.JPG", "album2/000007_00F16.jpg", "album2/photo.jpg"):
        image(tmp_path / name)
    assert rows(load_source("morph", tmp_path)) == [
        ("album2/000007_00F16.jpg", 16, "000007"),
        ("album2/012345_1M45.JPG", 45, "012345"),
        ("album2/photo.jpg", "photo.jpg", None),
    ]


# --- adience --------------------------------------------------------------------------------------

ADIENCE_HEADER = (
    "user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\tfiducial_yaw_angle\tfiducial_score\n"
)


def adience_folds(folder: Path, ages: list[str]) -> None:
    for fold, age in enumerate(ages):
        write(
            folder / f"fold_{fold}_data.txt",
            ADIENCE_HEADER + f"u{fold}@N0{fold}\t1{fold}.jpg\t{fold + 1}\t{age}\tf\t1\t2\t3\t4\t0\t0\t50\n",
        )


def test_adience_folds_paths_and_labels(tmp_path):
    adience_folds(tmp_path, ["(25, 32)", "(0,2)", "(38, 42)", "None", "35"])
    table = load_source("adience", tmp_path)
    assert list(table.columns) == ["path", "label", "group", "fold"]
    assert rows(table) == [
        ("faces/u0@N00/coarse_tilt_aligned_face.1.10.jpg", "(25, 32)", "u0@N00", 0),
        ("faces/u1@N01/coarse_tilt_aligned_face.2.11.jpg", "(0, 2)", "u1@N01", 1),
        ("faces/u2@N02/coarse_tilt_aligned_face.3.12.jpg", "(38, 42)", "u2@N02", 2),
        ("faces/u3@N03/coarse_tilt_aligned_face.4.13.jpg", "None", "u3@N03", 3),
        ("faces/u4@N04/coarse_tilt_aligned_face.5.14.jpg", "35", "u4@N04", 4),
    ]
    assert set(table["label"]) & set(ADIENCE_GROUPS) == {"(25, 32)", "(0, 2)"}


def test_adience_needs_all_five_fold_files_with_their_columns(tmp_path):
    adience_folds(tmp_path / "lists", ["(0, 2)"] * 4)
    with pytest.raises(SourceError, match="missing .*fold_4_data.txt"):
        load_source("adience", tmp_path, tmp_path / "lists")
    write(tmp_path / "lists" / "fold_4_data.txt", "user_id\tage\nu\t(0, 2)\n")
    with pytest.raises(SourceError, match="fold_4_data.txt: expected columns user_id, original_image"):
        load_source("adience", tmp_path, tmp_path / "lists")


# --- aesthetics -----------------------------------------------------------------------------------


def test_aesthetics_rater_median_rounds_half_up(tmp_path):
    write(
        tmp_path / "labels.csv",
        "image_id,category,rater1,rater2,rater3,rater4\n"
        "101,animals,2,3,3,4\n102,urban,2,3,,\n103,people,1,x,1,1\n",
    )
    assert rows(load_source("aesthetics", tmp_path)) == [
        ("101.jpg", 3, "animals"),
        ("102.jpg", 3, "urban"),
        ("103.jpg", "1,x,1,1", "people"),
    ]


def test_aesthetics_directory_of_per_category_lists(tmp_path):
    write(tmp_path / "lists" / "urban.tsv", "path\tscore\nu/1.png\t4.5\n")
    write(tmp_path / "lists" / "animals.csv", "id,mean\n7,1.49\n")
    assert rows(load_source("aesthetics", tmp_path, tmp_path / "lists")) == [
        ("7.jpg", 1, "animals"),
        ("u/1.png", 5, "urban"),
    ]


def test_aesthetics_without_grades_fails(tmp_path):
    write(tmp_path / "labels.csv", "image,category\n1,animals\n")
    with pytest.raises(SourceError, match="grade .*one of median, score, mean; found image, category"):
        load_source("aesthetics", tmp_path)


# --- clap2015 -------------------------------------------------------------------------------------


def test_clap2015_train_and_val(tmp_path):
    write(tmp_path / "train_gt.csv", "image,mean,stdv\nimage_1.jpg,24.5,3.2\nimage_2.jpg,30.49,1\n")
    write(tmp_path / "valid_gt.csv", "image,mean,stdv\nimage_9.jpg,nan,2\n")
    table = load_source("clap2015", tmp_path)
    assert rows(table) == [
        ("train/image_1.jpg", 25, None, "train", 3.2),
        ("train/image_2.jpg", 30, None, "train", 1.0),
        ("valid/image_9.jpg", "nan", None, "val", 2.0),
    ]


def test_clap2015_needs_both_ground_truth_files(tmp_path):
    write(tmp_path / "train_gt.csv", "image,mean,stdv\na.jpg,20,1\n")
    with pytest.raises(SourceError, match="valid_gt.csv"):
        load_source("clap2015", tmp_path)


# --- demo -----------------------------------------------------------------------------------------


def test_demo_source_generates_with_options(tmp_path):
    table = load_source("demo", tmp_path, n_per_rank=2, image_size=48, seed=3)
    assert len(table) == 20 and sorted(set(table["label"])) == list(range(1, 11))
    assert all((tmp_path / p).is_file() for p in table["path"])
    with pytest.raises(SourceError, match="takes no list file"):
        load_source("demo", tmp_path, "labels.csv")
