"""Bad input gives one clear line (file and reason) and loses nothing: issue 10, items 5-7, 11, 13, 16.

Each test runs the real stage (or loader) on a small real input, checks the message names the file
and the reason, and checks that no output and no input changed.
"""

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from l2rclip.config import Params, from_dict
from l2rclip.data.splits import read_splits
from l2rclip.data.validate import DataValidationError, validate_table
from l2rclip.models.backbone import TINY_ARCH, WeightsFileError, load_backbone, register_builtin_configs
from l2rclip.ranks import RankSpace
from l2rclip.stages import prepare as prepare_stage
from l2rclip.stages import train as train_stage

RANKS = RankSpace(list(range(1, 11)))


def checksums(folder: Path) -> dict[str, str]:
    """File -> sha256 of everything under `folder` (symlinks by target name, not followed)."""
    return {
        str(p.relative_to(folder)): (
            f"-> {os.readlink(p)}" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
        )
        for p in sorted(folder.rglob("*"))
        if p.is_symlink() or p.is_file()
    }


def picture(path: Path, seed: int, size: int = 16) -> Path:
    """A small noise PNG whose bytes differ for every seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def demo_params(tmp_path: Path, **overrides: dict) -> dict:
    """A tiny demo pipeline on the random-init tiny backbone, tracking off."""
    params = {
        "folds": [0, 1],
        "data": {"source": "demo", "root": str(tmp_path / "demo"), "demo": {"n_per_rank": 8, "image_size": 64}},
        "split": {"n_folds": 2, "val_fraction": 0.25},
        "model": {"arch": TINY_ARCH, "pretrained": "none"},
        "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "feature_cache": str(tmp_path / "cache")},
        "tracking": {"enabled": False},
    }
    for section, values in overrides.items():
        params[section] = {**params.get(section, {}), **values}
    return params


@pytest.fixture(scope="module")
def trained_fold(tmp_path_factory):
    """A prepared demo set and fold 0 trained for one epoch: the outputs a bad rerun must not lose."""
    tmp_path = tmp_path_factory.mktemp("trained")
    params = write_params(tmp_path / "params.yaml", demo_params(tmp_path))
    assert prepare_stage.main(["--params", str(params), "--out", str(tmp_path / "prepared")]) == 0
    out = tmp_path / "train"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pretrained none: "NOT CLIP"
        assert (
            train_stage.main(
                [
                    "--params",
                    str(params),
                    "--fold",
                    "0",
                    "--prepared",
                    str(tmp_path / "prepared"),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    return tmp_path, out


@pytest.mark.parametrize(
    ("override", "message", "at_load"),
    [
        ({"train": {"batch_size": -4}}, "'train.batch_size': expected a value >= 1, found -4", True),
        ({"train": {"lr_prompt": 0}}, "'train.lr_prompt': expected a value > 0, found 0.0", True),
        ({"split": {"val_fraction": 1.5}}, "'split.val_fraction': expected a value in [0, 0.5], found 1.5", True),
        (
            {"folds": [0, 2]},
            "'folds': expected fold numbers in 0..1 (split.n_folds is 2 for protocol kfold), found [2]",
            True,
        ),
        # Loads (each key is in range); the stage finds it before clearing its folder for a fresh run.
        (
            {"train": {"schedule": "two_stage"}, "model": {"image_tower": "frozen"}},
            "two_stage trains the image tower in stage 2: expected model.image_tower: train, found frozen",
            False,
        ),
    ],
)
def test_5_invalid_setting_fails_before_touching_the_fold_outputs(
    trained_fold, capsys, override, message, at_load
):
    tmp_path, out = trained_fold
    before = checksums(out)
    assert (out / "best" / "model.safetensors").is_file()
    params = demo_params(tmp_path, **{k: v for k, v in override.items() if k != "folds"})
    params["folds"] = override.get("folds", params["folds"])
    bad = write_params(tmp_path / "bad.yaml", params)
    code = train_stage.main(
        ["--params", str(bad), "--fold", "0", "--prepared", str(tmp_path / "prepared"), "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert (str(bad) in err) == at_load  # load-time errors name the params file
    assert checksums(out) == before  # the fold's outputs are all still there, byte for byte


def test_5_the_defaults_pass_their_own_ranges():
    from l2rclip.config import section_problems  # ranges are annotations of the fields themselves (schema)

    assert from_dict(Params, {}) == Params() and section_problems(Params()) == []


def test_6_ranks_too_small_to_stratify_name_the_ranks_and_the_setting(tmp_path, capsys):
    root = tmp_path / "data"
    rows = [
        (picture(root / f"{label}_{i}.png", seed=label * 100 + i).name, label)
        for label in range(1, 11)
        for i in range(9)
    ]  # 9 images in every rank, no group column
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(root / "labels.csv", index=False)
    source = checksums(root)
    out = tmp_path / "prepared"
    params = {"folds": [0, 1, 2, 3, 4], "data": {"source": "csv", "root": str(root)}}
    ok = write_params(tmp_path / "ok.yaml", {**params, "split": {"val_fraction": 0.2}})
    assert prepare_stage.main(["--params", str(ok), "--out", str(out)]) == 0
    outputs = checksums(out)
    bad = write_params(tmp_path / "bad.yaml", {**params, "split": {"val_fraction": 0.1}})
    with pytest.raises(SystemExit) as exit_info:
        prepare_stage.main(["--params", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and "n_splits" not in err
    assert (
        "split.val_fraction 0.1 (1 of 10 parts of the training part) needs a rank with at least 10 "
        "images, but every rank has fewer (images per rank label: 1: 7, " in err
    )
    assert "set split.val_fraction to at least 0.125 (1/8" in err
    ten = write_params(tmp_path / "ten.yaml", {**params, "folds": list(range(10)), "split": {"n_folds": 10}})
    with pytest.raises(SystemExit):
        prepare_stage.main(["--params", str(ten), "--out", str(out)])
    assert "split.n_folds 10 needs a rank with at least 10 images" in capsys.readouterr().err
    assert checksums(out) == outputs and checksums(root) == source


def other_architecture(folder: Path) -> str:
    """Register a second tiny open_clip config (wider image tower) and return its name."""
    register_builtin_configs()
    config = open_clip.get_model_config(TINY_ARCH)  # a copy
    config["vision_cfg"]["width"] = 96
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "L2RCLIP-Tiny-Wide.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return "L2RCLIP-Tiny-Wide"


def test_7_bad_weights_files_give_one_line_with_file_expected_and_found(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wide = load_backbone(other_architecture(tmp_path / "configs"), "none").model
        tiny = load_backbone(TINY_ARCH, "none").model
    good = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    save_file(good, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, tmp_path / "wide.safetensors")
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "partial.pt")
    inputs = checksums(tmp_path)
    expected = {
        "notes.pt": "the file cannot be read as weights: ",
        "truncated.safetensors": "the file cannot be read as weights: SafetensorError: Error while "
        "deserializing header: incomplete metadata",
        "wide.safetensors": "shape mismatches (e.g. visual.class_embedding: file (96,) vs model (64,))",
        "partial.pt": "missing keys (",
    }
    for name, found in expected.items():
        with pytest.raises(WeightsFileError) as error:
            load_backbone(TINY_ARCH, str(tmp_path / name))
        message = str(error.value)
        assert message.startswith(
            f"model.pretrained: {tmp_path / name}: expected open_clip L2RCLIP-Tiny weights"
        ), message
        assert found in message and "\n" not in message, message
    assert load_backbone(TINY_ARCH, str(tmp_path / "good.safetensors")).is_clip
    assert checksums(tmp_path) == inputs


def test_11_paths_leaving_the_root_are_bad_rows_unless_allowed(tmp_path):
    real = tmp_path / "store" / "images"
    for i, name in enumerate(("inside.png", "sub/deep.png", "absolute.png", "sub/real.png")):
        picture(real / name, i)
    picture(tmp_path / "store" / "secret.png", 10)
    picture(tmp_path / "elsewhere" / "linked.png", 11)
    picture(tmp_path / "elsewhere" / "other.png", 12)
    (real / "link.png").symlink_to(tmp_path / "elsewhere" / "linked.png")  # a DVC symlink cache does this
    table = pd.DataFrame(
        {
            "path": [
                "inside.png",
                "sub/../sub/deep.png",
                "../secret.png",
                str(tmp_path / "elsewhere/other.png"),
                str(real / "absolute.png"),
                "link.png",
            ],
            "label": [1, 2, 3, 3, 4, 5],
        }
    )
    inputs = checksums(tmp_path / "store")
    root = real / "sub" / ".."  # a root written with `..`, like ../shared/data/fgnet
    good, report = validate_table(table, root, RANKS)
    assert report[["row", "reason"]].values.tolist() == [[2, "outside_root"], [3, "outside_root"]]
    detail = report["detail"].tolist()[0]
    assert f"{tmp_path / 'store/secret.png'} is outside data.root {real}" in detail
    assert "data.allow_outside_root: true" in detail
    assert good["row"].tolist() == [0, 1, 4, 5]
    good, report = validate_table(table, root, RANKS, allow_outside_root=True)
    assert report.empty and len(good) == len(table)
    # A root reached through a symlink: absolute paths into its real folder are inside it.
    (tmp_path / "alias").symlink_to(real)
    real_path = pd.DataFrame({"path": [str(real / "sub" / "real.png")], "label": [6]})
    good, report = validate_table(real_path, tmp_path / "alias", RANKS)
    assert report.empty and len(good) == 1
    assert checksums(tmp_path / "store") == inputs


def test_13_every_skipped_file_is_reported_with_its_reason(tmp_path):
    root = tmp_path / "data"
    for label in (1, 2):
        for i in range(3):
            picture(root / str(label) / f"{i}.png", seed=label * 10 + i)
    Image.new("RGB", (8, 8)).save(root / "1" / "anim.gif")
    (root / "1" / "notes.txt").write_text("not an image")
    (root / "2" / "gone.png").symlink_to(root / "2" / "deleted.png")
    (root / "2" / "loop.png").symlink_to(root / "2" / "loop.png")
    (root / "2" / "more").symlink_to(root / "1")
    (root / "1" / ".hidden.png").write_bytes(b"")  # hidden files are ignored by design
    source = checksums(root)
    params = write_params(
        tmp_path / "params.yaml",
        {
            "folds": [0, 1],
            "ranks": {"start": 1, "stop": 2},
            "data": {"source": "folder", "root": str(root)},
            "split": {"n_folds": 2, "val_fraction": 0},
        },
    )
    assert prepare_stage.main(["--params", str(params), "--out", str(tmp_path / "out")]) == 0
    report = pd.read_csv(tmp_path / "out" / "bad_rows.csv")
    assert dict(zip(report["path"], report["reason"], strict=True)) == {
        "1/anim.gif": "unsupported_extension",
        "1/notes.txt": "unsupported_extension",
        "2/gone.png": "dangling_symlink",
        "2/loop.png": "symlink_loop",
        "2/more": "not_a_file",
    }
    assert "deleted.png, which does not exist" in report.set_index("path").at["2/gone.png", "detail"]
    assert len(pd.read_csv(tmp_path / "out" / "images.csv")) == 6
    # A symlink loop named in a list is a loop, not a missing file.
    table = pd.DataFrame({"path": ["2/loop.png", "2/nothing.png"], "label": [2, 2]})
    _, report = validate_table(table, root, RANKS)
    assert report["reason"].tolist() == ["symlink_loop", "missing_file"]
    assert checksums(root) == source


def duplicates_table(root: Path) -> pd.DataFrame:
    """a = a_copy (same label), c = c_copy (labels 3 and 4), plus distinct images."""
    for name, seed in (("a.png", 1), ("c.png", 2), *((f"x{i}.png", 10 + i) for i in range(6))):
        picture(root / name, seed)
    shutil.copyfile(root / "a.png", root / "a_copy.png")
    shutil.copyfile(root / "c.png", root / "c_copy.png")
    rows = [
        ("a.png", 1),
        ("c.png", 3),
        ("a_copy.png", 1),
        ("c_copy.png", 4),
        *((f"x{i}.png", 1 + i % 2) for i in range(6)),
    ]
    return pd.DataFrame(rows, columns=["path", "label"])


def test_16_identical_content_is_found_and_conflicting_labels_are_not_trained(tmp_path):
    table = duplicates_table(tmp_path)
    inputs = checksums(tmp_path)
    good, report = validate_table(table, tmp_path, RANKS)
    assert report[["path", "reason"]].values.tolist() == [
        ["c.png", "conflicting_labels"],
        ["a_copy.png", "duplicate_content"],
        ["c_copy.png", "conflicting_labels"],
    ]
    details = report.set_index("path")["detail"]
    assert "same content (sha256 " in details["a_copy.png"] and "as row 0 (a.png)" in details["a_copy.png"]
    assert "labelled 3 there, 4 here; none is kept" in details["c_copy.png"]
    assert "a.png" in good["path"].tolist() and not {"c.png", "c_copy.png"} & set(good["path"])
    good, report = validate_table(table, tmp_path, RANKS, duplicates="keep_first")
    assert "c.png" in good["path"].tolist() and "c_copy.png" in report["path"].tolist()
    with pytest.raises(DataValidationError, match=r"row 3 of the source table \(c_copy.png\): conflicting_labels"):
        validate_table(table, tmp_path, RANKS, duplicates="fail")
    assert checksums(tmp_path) == inputs


def test_16_a_picture_under_two_names_never_sits_in_train_and_test(tmp_path):
    root = tmp_path / "data"
    table = duplicates_table(root)
    # Per-fold lists (fold + split): the copy in fold 0's test part duplicates fold 0's train image.
    per_fold = pd.DataFrame(
        {
            "path": ["a.png", "a_copy.png", "x0.png", "a_copy.png", "x1.png"],
            "label": [1, 1, 1, 1, 2],
            "fold": [0, 0, 0, 1, 1],
            "split": ["train", "test", "test", "train", "test"],
        }
    )
    good, report = validate_table(per_fold, root, RANKS)
    assert report[["row", "reason"]].values.tolist() == [[1, "duplicate_content"]]
    assert good["row"].tolist() == [0, 2, 3, 4]  # fold 1 lists the picture once: kept
    table.to_csv(root / "labels.csv", index=False)
    params = write_params(
        tmp_path / "params.yaml",
        {
            "folds": [0, 1],
            "ranks": {"start": 1, "stop": 4},
            "data": {"source": "csv", "root": str(root)},
            "split": {"n_folds": 2, "val_fraction": 0, "missing_ranks": "warn"},
        },
    )
    assert prepare_stage.main(["--params", str(params), "--out", str(tmp_path / "out")]) == 0
    splits = read_splits(tmp_path / "out" / "splits.csv")
    content = splits["path"].map(lambda p: hashlib.sha256((root / p).read_bytes()).hexdigest())
    assert (splits.assign(content=content).groupby(["fold", "content"]).size() == 1).all()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["bad_by_reason"] == {"conflicting_labels": 2, "duplicate_content": 1}
