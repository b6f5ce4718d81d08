"""Validation: every kind of bad row is reported with its reason; odd pixel formats load as RGB."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from l2rclip.data import validate
from l2rclip.data.validate import DataValidationError, load_rgb, validate_table
from l2rclip.ranks import RankSpace

RANKS = RankSpace(range(1, 11))
EXIF_ORIENTATION = 0x0112


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width x height` pixels but holds no image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def write_good_images(folder: Path) -> dict[str, str]:
    """One image per awkward-but-valid format; returns file name -> expected stored mode."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("L", (16, 12), 90).save(folder / "grey.png")
    rgba = Image.new("RGBA", (16, 12), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(folder / "alpha.png")
    palette = Image.new("P", (16, 12), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.save(folder / "palette.png", transparency=0)
    Image.new("LA", (16, 12), (200, 0)).save(folder / "grey_alpha.png")
    Image.new("CMYK", (16, 12), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((12, 16), 128 * 257, dtype=np.uint16)).save(folder / "wide.png")
    rotated = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    rotated.save(folder / "rotated.jpg", exif=exif)
    noise((16, 12)).save(folder / "plain.jpg")
    return {"grey.png": "L", "alpha.png": "RGBA", "palette.png": "P", "grey_alpha.png": "LA",
            "cmyk.jpg": "CMYK", "wide.png": "I;16", "rotated.jpg": "RGB", "plain.jpg": "RGB"}


def build_mixed_source(folder: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """Good images of every format and one row of each bad kind, listed in `folder/labels.csv`.

    Returns the table and, for each bad row's path, its expected reason (labels are 1 or 2).
    """
    good = write_good_images(folder)
    (folder / "empty.jpg").write_bytes(b"")
    noise((64, 64), seed=1).save(folder / "whole.jpg", quality=95)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    (folder / "garbage.jpg").write_bytes(np.random.default_rng(2).bytes(500))
    (folder / "bomb.png").write_bytes(png_header_only(10_000, 10_000))  # warning-sized: > MAX pixels
    (folder / "huge_bomb.png").write_bytes(png_header_only(20_000, 20_000))  # > 2 x MAX: PIL's error
    Image.new("RGB", (8, 8)).save(folder / "text_label.png")
    Image.new("RGB", (8, 8)).save(folder / "eleven.png")
    rows = [(name, 1 + i % 2, f"p{i}") for i, name in enumerate(sorted(good))]
    bad = {"missing.jpg": ("missing_file", 1), "empty.jpg": ("empty_file", 2),
           "truncated.jpg": ("corrupt_image", 1), "garbage.jpg": ("corrupt_image", 2),
           "bomb.png": ("decompression_bomb", 1), "huge_bomb.png": ("decompression_bomb", 2),
           "text_label.png": ("non_numeric_label", "abc"), "eleven.png": ("label_not_in_ranks", 11)}
    rows += [(name, label, f"q{i}") for i, (name, (_, label)) in enumerate(bad.items())]
    rows.append(("plain.jpg", 2, "p_dup"))
    table = pd.DataFrame(rows, columns=["path", "label", "group"])
    table.to_csv(folder / "labels.csv", index=False)
    return table, {name: reason for name, (reason, _) in bad.items()}


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
    table = pd.DataFrame({"path": ["plain.jpg", "plain.jpg", "grey.png", "plain.jpg"],
                          "label": [1, 1, 2, 1], "fold": [0, 1, 0, 0],
                          "split": ["train", "train", "test", "test"]})
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
    pixel = {name: load_rgb(tmp_path / name).getpixel((0, 0)) for name in
             ("grey.png", "alpha.png", "palette.png", "grey_alpha.png", "wide.png")}
    assert pixel == {"grey.png": (90, 90, 90), "alpha.png": (255, 255, 255),
                     "palette.png": (255, 255, 255), "grey_alpha.png": (255, 255, 255),
                     "wide.png": (128, 128, 128)}
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
    dropped = [[0, "conflicting_labels"], [2, "conflicting_labels"]] if policy == "drop_conflicts" \
        else [[2, "conflicting_labels"]]
    assert outcomes == [(kept, dropped), (kept, dropped)]
