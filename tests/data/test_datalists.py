"""The authors' real split lists (../shared/data/l2rclip-datalists), read unchanged by the sources.

Expected counts come from the files themselves (their non-blank lines, counted here without the
sources' code), never from numbers typed in. Images are not published with the lists: tests that
validate make tiny dummy images for the listed names in a temporary folder (one shared JPEG's
bytes per name, which is fast); the 55,134-image settings C/D only check the source table, with
dummy images for a sample of names to check that they are found by file name.
"""

import csv
import io
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from support.project import ROOT

from l2rclip.config import Params, from_dict
from l2rclip.data.sources import load_source
from l2rclip.data.validate import validate_table
from l2rclip.evaluation.reproduce import find_preset
from l2rclip.ranks import RankSpace
from l2rclip.stages.prepare import prepare

pytestmark = pytest.mark.data

PROTOCOLS = ROOT / "protocols"


@pytest.fixture(scope="module")
def lists(shared_data: Path) -> Path:
    folder = shared_data / "l2rclip-datalists"
    if not folder.is_dir():
        pytest.skip(f"the authors' split lists are not present at {folder}")
    return folder


def lines(path: Path, header: bool = False) -> list[str]:
    """Non-blank lines of a list, without its header line."""
    found = [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    return found[1:] if header else found


def dummy_images(root: Path, names: list[str]) -> None:
    """A valid 2x2 JPEG at every name under `root`, written fast: the same image, each file with its own
    trailing bytes after the end-of-image marker (decoders ignore them), so no two files are the same
    content (validation reports identical files as duplicates)."""
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (120, 60, 30)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    for i, name in enumerate(dict.fromkeys(names)):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data + str(i).encode())


def morph_name(line: str) -> str:
    """The file name of a setting A/B row, whichever separator it uses."""
    return re.split(r"[,\s]+", line.strip())[-2]


# --- MORPH ---------------------------------------------------------------------------------------


def test_morph_setting_a(lists, tmp_path):
    folder = lists / "morph" / "settingA"
    expected = {
        (k, split): lines(folder / f"Setting_A_fold{k}_{split}.txt", header=True)
        for k in range(5)
        for split in ("train", "test")
    }
    names = [morph_name(line) for rows in expected.values() for line in rows]
    present = set(sorted(set(names))[::20])  # images for a sample: the others must be missing_file rows
    dummy_images(tmp_path / "Album2", sorted(present))
    table = load_source("morph", tmp_path, folder)
    assert len(table) == sum(len(rows) for rows in expected.values()) == 27460
    assert table.groupby(["fold", "split"]).size().to_dict() == {k: len(v) for k, v in expected.items()}
    assert table["path"].tolist() == [f"Album2/{n}" if n in present else n for n in names]
    assert table["group"].tolist() == [n.split("_")[0] for n in names]
    assert {"race", "gender"} <= set(table.columns)
    good, report = validate_table(table, tmp_path, RankSpace(list(range(16, 78))), workers=2)
    assert len(good) == sum(n in present for n in names)
    assert set(report["reason"]) == {"missing_file"} and len(report) == len(table) - len(good)


def test_morph_setting_b(lists, tmp_path):
    folder = lists / "morph" / "settingB"
    subsets = [lines(folder / f"Setting_B_fold{k}.txt", header=True) for k in range(3)]
    table = load_source("morph", tmp_path, folder)
    assert len(table) == 3 * sum(len(s) for s in subsets) == 63000
    for fold, subset in enumerate(subsets):
        rows = table[table["fold"] == fold]
        train = rows.loc[rows["split"] == "train", "path"].tolist()
        assert train == [morph_name(line) for line in subset]
        assert (rows["split"] == "test").sum() == sum(len(s) for k, s in enumerate(subsets) if k != fold)
    assert set(table["race"]) == {0, 1} and set(table["gender"]) == {0, 1}


@pytest.mark.parametrize("setting", ["C", "D"])
def test_morph_settings_c_and_d(lists, tmp_path, setting):
    files = sorted((lists / "morph" / f"setting{setting}").glob(f"morph_{setting}_*.txt"))
    expected = [lines(path) for path in files]
    names = [line.split()[0].rsplit("/", 1)[-1] for rows in expected for line in rows]
    sample = names[::500]
    dummy_images(tmp_path / "image", sample)
    table = load_source("morph", tmp_path, files[0].parent)
    assert len(table) == sum(map(len, expected)) == 55134
    assert table["fold"].value_counts().sort_index().tolist() == [len(rows) for rows in expected]
    found = table[table["path"].str.startswith("image/")]
    assert sorted(found["path"]) == sorted(f"image/{n}" for n in sample)
    assert table["group"].notna().all()
    assert table["label"].tolist() == [int(line.split()[1]) for rows in expected for line in rows]
    spread = (table.groupby("group")["fold"].nunique() > 1).mean()  # share of subjects in several folds
    if setting == "D":  # "subject-exclusive", but as published 180 of 13,617 subjects span two folds
        assert 0 < spread < 0.02
    else:
        assert spread > 0.5


# --- Adience, HCI, CrowdBeauty, CLAP2015 ---------------------------------------------------------


def test_adience_simplified_folds(lists, tmp_path):
    expected = [lines(lists / "adience" / f"simplified_adience_{k}.txt") for k in range(5)]
    table = load_source("adience", tmp_path, lists / "adience")
    assert table["fold"].value_counts().sort_index().tolist() == [len(rows) for rows in expected]
    assert len(table) == 17470
    listed = [line.split()[0] for rows in expected for line in rows]
    assert table["path"].tolist() == listed  # no images: the listed paths are kept for validation
    assert table["group"].tolist() == [path.split("/")[0] for path in listed]
    assert table["label"].tolist() == [int(line.split()[1]) for rows in expected for line in rows]
    assert set(table["label"]) == set(range(8))
    assert table.groupby("group")["fold"].nunique().max() == 1  # subject-exclusive


def test_hci_lists_through_prepare_with_the_preset(lists, tmp_path):
    per_decade = {d: lines(lists / "hci" / f"{d}s.txt") for d in range(1930, 1980, 10)}
    dummy_images(tmp_path / "hci", [line.split()[0] for rows in per_decade.values() for line in rows])
    preset = find_preset("hci", PROTOCOLS)
    data = {**preset.params["data"], "root": str(tmp_path / "hci"), "list_file": str(lists / "hci")}
    params = from_dict(Params, {**preset.params, "data": {**data, "decode_workers": 2}})
    summary = prepare(params, tmp_path / "out")
    assert summary["rows"] == {"total": 1325, "good": 1325, "bad": 0}
    assert [r["images"] for r in summary["ranks"]] == [len(rows) for rows in per_decade.values()]
    assert [(f["train"], f["val"], f["test"]) for f in summary["folds"]] == [(1050, 25, 250)] * 10


def test_hci_missing_images_are_bad_rows(lists, tmp_path):
    listed = lines(lists / "hci" / "1930s.txt")
    dummy_images(tmp_path, [line.split()[0] for line in listed[1:]])
    table = load_source("hci", tmp_path, lists / "hci" / "1930s.txt")
    _, report = validate_table(table, tmp_path, RankSpace([1930, 1940, 1950, 1960, 1970]), workers=2)
    assert report[["path", "reason"]].values.tolist() == [[listed[0].split()[0][2:], "missing_file"]]


@pytest.mark.parametrize("category", ["animals", "nature", "people", "urban"])
def test_crowdbeauty_category(lists, tmp_path, category):
    folder = lists / "crowdbeauty"
    expected = {split: lines(folder / f"{category}_{split}.txt") for split in ("train", "test")}
    table = load_source("aesthetics", tmp_path, folder, category=category)
    assert table["split"].value_counts().to_dict() == {k: len(v) for k, v in expected.items()}
    assert len(table) == len(lines(folder / f"{category}_datasets.txt"))
    assert set(table["category"]) == {category} and set(table["label"]) <= set(range(1, 6))
    scores = [float(line.split("\t")[1]) for split in ("train", "test") for line in expected[split]]
    assert table["label"].tolist() == [int(s + 0.5) for s in scores]


def test_clap2015_total_list(lists, tmp_path):
    path = lists / "clap2015" / "total_2015.csv"
    with path.open(encoding="utf-8-sig", newline="") as handle:
        records = list(csv.DictReader(handle))
    dummy_images(tmp_path / "train", [r["filename"] for r in records if r["database"] == "train"])
    table = load_source("clap2015", tmp_path, path)
    assert len(table) == len(records) == 4691
    assert table["split"].value_counts().to_dict() == dict(Counter(r["database"] for r in records))
    assert table["stdv"].tolist() == [float(r["stdv"]) for r in records]
    assert (table.loc[table["split"] == "train", "path"].str.startswith("train/")).all()
