"""Validation: every kind of bad row is reported with its reason; odd pixel formats load as RGB."""

import numpy as np
import pandas as pd
import pytest
from support.sources import build_mixed_source, write_good_images

from l2rclip.data import validate
from l2rclip.data.validate import DataValidationError, load_rgb, validate_table
from l2rclip.ranks import RankSpace

RANKS = RankSpace(range(1, 11))


def test_every_bad_kind_is_reported_and_good_rows_go_on(tmp_path):
    table, expected = build_mixed_source(tmp_path)
    good, report = validate_table(table, tmp_path, RANKS, workers=3)
    reasons = dict(zip(report["path"], report["reason"], strict=True))
    duplicate = report[report["reason"] == "duplicate"]
    assert duplicate["row"].tolist() == [len(table) - 1]
    assert "same path as row" in duplicate["detail"].item()
    assert {p: r for p, r in reasons.items() if r != "duplicate"} == expected
    assert report["row"].is_monotonic_increasing
    assert len(good) == 8 and good["path"].is_unique
    assert set(good.columns) >= {"row", "rank", "value", "width", "height", "mode"}
    assert (good["rank"] == good["label"].astype(int) - 1).all()
    rotated = good.set_index("path").loc["rotated.jpg"]
    assert (rotated["width"], rotated["height"]) == (20, 40)  # as displayed, after EXIF rotation
    assert "1 .. 10" in report.set_index("path").at["eleven.png", "detail"]


def test_fail_stops_at_the_first_bad_row(tmp_path):
    table, _ = build_mixed_source(tmp_path)
    first_bad = table.index[table["path"] == "missing.jpg"][0]
    with pytest.raises(DataValidationError, match=rf"row {first_bad} .*missing\.jpg.*missing_file"):
        validate_table(table, tmp_path, RANKS, on_bad="fail")


def test_output_does_not_depend_on_the_number_of_threads(tmp_path):
    table, _ = build_mixed_source(tmp_path)
    one = validate_table(table, tmp_path, RANKS, workers=1)
    many = validate_table(table, tmp_path, RANKS, workers=8)
    for a, b in zip(one, many, strict=True):
        pd.testing.assert_frame_equal(a, b)


def test_each_file_is_decoded_once_and_fold_lists_are_not_duplicates(tmp_path, monkeypatch):
    write_good_images(tmp_path)
    seen = []
    decode = validate._decode
    monkeypatch.setattr(validate, "_decode", lambda file, **limit: seen.append(file) or decode(file, **limit))
    table = pd.DataFrame(
        {
            "path": ["plain.jpg", "plain.jpg", "grey.png", "plain.jpg"],
            "label": [1, 1, 2, 1],
            "fold": [0, 1, 0, 0],
            "split": ["train", "train", "test", "test"],
        }
    )
    good, report = validate_table(table, tmp_path, RANKS)
    assert sorted(seen) == sorted({str(tmp_path / "plain.jpg"), str(tmp_path / "grey.png")})
    assert good["row"].tolist() == [0, 1, 2]
    assert report[["row", "reason"]].values.tolist() == [[3, "duplicate"]]
    assert "in fold 0" in report["detail"].item()


def test_table_structure_errors_name_the_column(tmp_path):
    with pytest.raises(DataValidationError, match=r"unknown column 'age'.*path, label, group, fold, split"):
        validate_table(pd.DataFrame({"path": ["a.png"], "label": [1], "age": [3]}), tmp_path, RANKS)
    with pytest.raises(DataValidationError, match="lacks required column 'label'"):
        validate_table(pd.DataFrame({"path": ["a.png"]}), tmp_path, RANKS)


def test_label_problems_and_text_rank_spaces(tmp_path):
    write_good_images(tmp_path)
    table = pd.DataFrame({"path": ["plain.jpg", "grey.png", "wide.png"], "label": [None, " 3 ", "x"]})
    good, report = validate_table(table, tmp_path, RANKS)
    assert report["reason"].tolist() == ["missing_label", "non_numeric_label"]
    assert good["rank"].tolist() == [2]
    groups = RankSpace(["(0, 2)", "(4, 6)"], values=[1, 5])
    table = pd.DataFrame({"path": ["plain.jpg", "grey.png"], "label": ["(4, 6)", "(8, 12)"]})
    good, report = validate_table(table, tmp_path, groups)
    assert good["value"].tolist() == [5.0]
    assert report["reason"].tolist() == ["label_not_in_ranks"]


def test_load_rgb_converts_every_format(tmp_path):
    write_good_images(tmp_path)
    pixel = {
        name: load_rgb(tmp_path / name).getpixel((0, 0))
        for name in ("grey.png", "alpha.png", "palette.png", "grey_alpha.png", "wide.png")
    }
    assert pixel == {
        "grey.png": (90, 90, 90),
        "alpha.png": (255, 255, 255),
        "palette.png": (255, 255, 255),
        "grey_alpha.png": (255, 255, 255),
        "wide.png": (128, 128, 128),
    }
    assert load_rgb(tmp_path / "alpha.png").getpixel((1, 0)) == (255, 0, 0)
    assert load_rgb(tmp_path / "palette.png").getpixel((1, 0)) == (0, 0, 255)
    assert load_rgb(tmp_path / "palette.png", background=(9, 9, 9)).getpixel((0, 0)) == (9, 9, 9)
    red = np.asarray(load_rgb(tmp_path / "cmyk.jpg"), dtype=int)
    assert np.abs(red - [255, 0, 0]).max() < 8
    rotated = load_rgb(tmp_path / "rotated.jpg")
    assert rotated.size == (20, 40) and rotated.mode == "RGB"
    for name in ("grey.png", "alpha.png", "cmyk.jpg", "wide.png", "plain.jpg"):
        assert load_rgb(tmp_path / name).mode == "RGB"


@pytest.mark.parametrize("policy", ["drop_conflicts", "keep_first", "fail"])
def test_same_path_with_two_labels_is_decided_like_same_content_under_two_names(tmp_path, policy):
    """Issue 21.3: `data.duplicates` decides one path listed with two labels as one picture under two names."""
    write_good_images(tmp_path)
    (tmp_path / "plain_copy.jpg").write_bytes((tmp_path / "plain.jpg").read_bytes())
    same_path = pd.DataFrame({"path": ["plain.jpg", "grey.png", "plain.jpg"], "label": [1, 2, 3]})
    same_content = same_path.assign(path=["plain.jpg", "grey.png", "plain_copy.jpg"])
    if policy == "fail":
        for table in (same_path, same_content):
            with pytest.raises(DataValidationError, match=r"row 2 of the source table .*conflicting_labels"):
                validate_table(table, tmp_path, RANKS, duplicates=policy)
        return
    outcomes = []
    for table in (same_path, same_content):
        good, report = validate_table(table, tmp_path, RANKS, duplicates=policy)
        outcomes.append((good["row"].tolist(), report[["row", "reason"]].values.tolist()))
    kept = [1] if policy == "drop_conflicts" else [0, 1]
    dropped = (
        [[0, "conflicting_labels"], [2, "conflicting_labels"]]
        if policy == "drop_conflicts"
        else [[2, "conflicting_labels"]]
    )
    assert outcomes == [(kept, dropped), (kept, dropped)]
