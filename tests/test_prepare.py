"""The prepare stage end to end: bad data, real FG-NET, determinism, command line."""

import hashlib
import json
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_validate import build_mixed_source

from l2rclip.config import Params, from_dict
from l2rclip.data.splits import read_splits
from l2rclip.data.validate import DataValidationError
from l2rclip.stages.prepare import main, prepare

OUTPUTS = ("images.csv", "bad_rows.csv", "splits.csv", "summary.json")


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def mixed_params(root: Path, on_bad: str = "skip") -> Params:
    return from_dict(Params, {"folds": [0, 1], "ranks": {"start": 1, "stop": 2},
                              "data": {"source": "csv", "root": str(root), "on_bad": on_bad},
                              "split": {"n_folds": 2, "val_fraction": 0, "missing_ranks": "warn"}})


def demo_params(root: Path) -> dict:
    return {"folds": [0, 1, 2],
            "data": {"source": "demo", "root": str(root), "demo": {"n_per_rank": 6, "image_size": 48}},
            "split": {"n_folds": 3, "val_fraction": 0.25}}


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
    with pytest.raises(DataValidationError, match=r"row 8 .*missing\.jpg\): missing_file"):
        prepare(mixed_params(source, on_bad="fail"), tmp_path / "out_fail")
    assert checksums(source) == before


@pytest.mark.data
def test_prepare_on_fgnet_keeps_people_on_one_side(shared_data, tmp_path):
    params = from_dict(Params, {
        "ranks": {"start": 0, "stop": 69},
        "data": {"source": "fgnet", "root": str(shared_data / "fgnet")},
        "split": {"protocol": "kfold", "n_folds": 5, "missing_ranks": "warn"}})
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
