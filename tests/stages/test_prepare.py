"""The prepare stage end to end: bad data, real FG-NET, determinism, command line."""

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from support.sources import build_mixed_source

from l2rclip.cli import build_parser
from l2rclip.config import Params, from_dict
from l2rclip.data.splits import SplitError, read_splits
from l2rclip.data.validate import DataValidationError
from l2rclip.stages.prepare import main, prepare

OUTPUTS = ("images.csv", "bad_rows.csv", "splits.csv", "summary.json")


def checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def mixed_params(root: Path, on_bad: str = "skip") -> Params:
    return from_dict(
        Params,
        {
            "folds": [0, 1],
            "ranks": {"start": 1, "stop": 2},
            "data": {"source": "csv", "root": str(root), "on_bad": on_bad},
            "split": {"n_folds": 2, "val_fraction": 0, "missing_ranks": "warn"},
        },
    )


def demo_params(root: Path) -> dict:
    return {
        "folds": [0, 1, 2],
        "data": {"source": "demo", "root": str(root), "demo": {"n_per_rank": 6, "image_size": 48}},
        "split": {"n_folds": 3, "val_fraction": 0.25},
    }


def assert_folds_are_sound(splits: pd.DataFrame, images: pd.DataFrame) -> None:
    """No group on two sides of a fold, and every image in exactly one test fold."""
    for _fold, rows in splits.groupby("fold"):
        assert (rows.groupby("group")["split"].nunique() == 1).all()
        assert rows["path"].is_unique
    tests = splits.loc[splits["split"] == "test", "path"]
    assert tests.is_unique and set(tests) == set(images["path"])


def test_prepare_reports_bad_rows_goes_on_and_never_touches_the_source(tmp_path):
    source = tmp_path / "source"
    _, expected = build_mixed_source(source)
    before = checksums(source)
    summary = prepare(mixed_params(source), tmp_path / "out")
    bad = pd.read_csv(tmp_path / "out" / "bad_rows.csv")
    named = bad[bad["reason"] != "duplicate"]
    assert dict(zip(named["path"], named["reason"], strict=True)) == expected
    assert bad["reason"].value_counts()["duplicate"] == 1
    assert summary["rows"] == {"total": 17, "good": 8, "bad": 9}
    assert summary["bad_by_reason"]["decompression_bomb"] == 2
    images = pd.read_csv(tmp_path / "out" / "images.csv")
    assert len(images) == 8 and set(images["mode"]) >= {"L", "RGBA", "P", "CMYK", "I;16"}
    assert_folds_are_sound(read_splits(tmp_path / "out" / "splits.csv"), images)
    with pytest.raises(DataValidationError, match=r"labels\.csv, data row 9 \(missing\.jpg\): missing_file"):
        prepare(mixed_params(source, on_bad="fail"), tmp_path / "out_fail")
    assert checksums(source) == before


@pytest.mark.data
def test_prepare_on_fgnet_keeps_people_on_one_side(shared_data, tmp_path):
    params = from_dict(
        Params,
        {
            "ranks": {"start": 0, "stop": 69},
            "data": {"source": "fgnet", "root": str(shared_data / "fgnet")},
            "split": {"protocol": "kfold", "n_folds": 5, "missing_ranks": "warn"},
        },
    )
    started = time.perf_counter()
    summary = prepare(params, tmp_path)
    assert time.perf_counter() - started < 30
    assert summary["rows"] == {"total": 1002, "good": 1002, "bad": 0}
    images = pd.read_csv(tmp_path / "images.csv", dtype={"group": str})
    splits = read_splits(tmp_path / "splits.csv")
    assert images["group"].nunique() == 82
    assert_folds_are_sound(splits, images)
    assert 56 in summary["folds"][0]["missing_train_ranks"]  # no 56-year-old in FG-NET at all


def test_prepare_on_demo_is_byte_identical_across_runs(tmp_path):
    params = from_dict(Params, demo_params(tmp_path / "demo"))
    prepare(params, tmp_path / "a")
    prepare(params, tmp_path / "b")
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert [f["test"] for f in summary["folds"]] == [20, 20, 20]
    assert [r["images"] for r in summary["ranks"]] == [6] * 10


def test_main_writes_outputs_and_reports_errors_without_a_traceback(tmp_path, capsys):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(demo_params(tmp_path / "demo")))
    assert main(["--params", str(params_file), "--out", str(tmp_path / "out")]) == 0
    assert all((tmp_path / "out" / name).is_file() for name in OUTPUTS)
    params_file.write_text(yaml.safe_dump({**demo_params(tmp_path / "demo"), "split": {"n_folds": 1}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", str(params_file), "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2
    assert "'split.n_folds': expected a value >= 2, found 1" in capsys.readouterr().err


def test_prepare_never_rewrites_a_demo_set_made_with_other_settings(tmp_path, capsys):
    """Issue 21.1: only the `demo` stage writes data/demo; a side prepare with another seed refuses."""
    root = tmp_path / "demo"
    prepare(from_dict(Params, demo_params(root)), tmp_path / "first")  # an empty folder: first use generates it
    before = checksums(root)
    params_file = tmp_path / "other.yaml"
    params_file.write_text(yaml.safe_dump({**demo_params(root), "seed": 7}))
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", str(params_file), "--out", str(tmp_path / "elsewhere")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "seed=7, n_per_rank=6, image_size=48; found settings seed=0" in err and "dvc repro demo" in err
    assert checksums(root) == before and not (tmp_path / "elsewhere").exists()


def test_prepare_reports_an_unwritable_demo_folder_in_one_line(tmp_path, capsys, monkeypatch):
    """Issue 21.1: a read-only copy (simulated: root bypasses file modes) gives one line, no OSError traceback."""
    import l2rclip.data.sources.demo as demo_module

    def read_only(root, **_):
        raise OSError(30, "Read-only file system", str(root / "images"))

    monkeypatch.setattr(demo_module, "generate_demo", read_only)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(demo_params(tmp_path / "demo")))
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", str(params_file), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert f"cannot generate the demo set in {tmp_path / 'demo'}: Read-only file system" in err


def own_faces(root: Path) -> Path:
    """A user's own set as a CSV list: 24 noise images of 8 people aged 16..27, ranks not yet set."""
    root.mkdir(parents=True)
    lines = ["path,label,group"]
    for i in range(24):
        pixels = np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"face{i}.png")
        lines.append(f"face{i}.png,{16 + i % 12},person{i % 8}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def own_params(root: Path, **data: str) -> dict:
    return {
        "folds": [0, 1],
        "data": {"source": "csv", "root": str(root), **data},
        "split": {
            "n_folds": 2,
            "val_fraction": 0,
            "calib_fraction": 0,
            "holdout_fraction": 0,
            "missing_ranks": "warn",
        },
    }


def test_labels_outside_the_ranks_name_the_file_row_and_the_ranks_to_set(tmp_path, capsys):
    root = own_faces(tmp_path / "faces")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(own_params(root)))  # the demo's ranks 1..10
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", str(params_file), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"none of the 24 rows of source 'csv' at {root / 'labels.csv'} is usable" in err
    assert (
        "24 of 24 rows have labels outside the ranks 1 .. 10 (10 ranks): the labels found run from 16 to 27 "
        "(12 distinct): set ranks.start: 16 and ranks.stop: 27 in params.yaml"
    ) in err
    assert not (tmp_path / "out").exists()  # nothing written

    with pytest.raises(
        DataValidationError,
        match=(
            rf"{root / 'labels.csv'}, data row 1 \(face0\.png\): label_not_in_ranks: label 16 is not a rank; "
            r"expected one of 1 \.\. 10 \(10 ranks\); the labels found run from 16 to 27 .*ranks\.start: 16 "
            r"and ranks\.stop: 27"
        ),
    ):
        prepare(from_dict(Params, own_params(root, on_bad="fail")), tmp_path / "out")

    few = own_params(root)  # ranks 27..38 keep only the two images aged 27: too few for 3 folds
    few["ranks"], few["split"]["n_folds"] = {"start": 27, "stop": 38}, 3
    with pytest.raises(
        SplitError,
        match=r"3 folds need at least 3 groups .*, found 2; 22 of 24 rows have labels "
        r"outside the ranks .*set ranks\.start: 16 and ranks\.stop: 27",
    ):
        prepare(from_dict(Params, few), tmp_path / "out")

    fixed = own_params(root)
    fixed["ranks"] = {"start": 16, "stop": 27}  # what the message says to set
    summary = prepare(from_dict(Params, fixed), tmp_path / "out")
    assert summary["rows"] == {"total": 24, "good": 24, "bad": 0}
    assert [r["label"] for r in summary["ranks"]] == list(range(16, 28))


def test_text_labels_outside_the_ranks_suggest_ranks_labels():
    from l2rclip.data.validate import ranks_hint

    assert ranks_hint(["(0, 2)", "(4, 6)", "(0, 2)", None]) == (
        "the labels found are (0, 2), (4, 6): list them in rank order as ranks.labels in params.yaml "
        "(with ranks.values for their numbers)"
    )
    assert ranks_hint([3, "7", 5.0]).startswith("the labels found run from 3 to 7 (3 distinct)")


def test_own_folder_layout_prepares_with_folder_names_as_labels(tmp_path):
    root = tmp_path / "grades"
    for i, grade in enumerate([1, 1, 2, 2, 3, 3, 1, 2, 3, 1, 2, 3]):
        (root / str(grade)).mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(100 + i).integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / str(grade) / f"img{i}.png")
    params = own_params(root)
    params["data"]["source"] = "folder"
    params["ranks"] = {"start": 1, "stop": 3}
    summary = prepare(from_dict(Params, params), tmp_path / "out")
    assert [r["images"] for r in summary["ranks"]] == [4, 4, 4]


@pytest.mark.parametrize("argv", [["--help"], None])
def test_prepare_help_names_both_own_data_formats(argv, capsys):
    """`python -m l2rclip.stages.prepare --help` and `l2rclip prepare --help` say what a user's data looks like."""
    with pytest.raises(SystemExit) as exit_info:
        if argv is None:
            build_parser().parse_args(["prepare", "--help"])
        else:
            main(argv)
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for words in (
        "<data.root>/labels.csv",
        "path ",
        "label ",
        "group ",
        "fold ",
        "split ",
        "required",
        "optional",
        "one folder per label: <data.root>/<label>/<image>",
        "ranks.start..ranks.stop",
        "ranks.labels",
        "bad_rows.csv",
    ):
        assert words in out, words
