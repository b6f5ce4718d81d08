"""Prediction: rows in input order, bad inputs on their own rows, the evaluate stage's numbers."""

import base64
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from support.models import NUMBERS, PROBABILITIES, save_tiny_model, tiny_l2rclip
from support.sources import png_header_only

from l2rclip import cli
from l2rclip.data.dataset import RankImageDataset, make_loader
from l2rclip.data.demo import generate_demo
from l2rclip.data.validate import DEFAULT_MAX_PIXELS, load_rgb, validate_table
from l2rclip.evaluation.predictions import predict_probabilities, predictions_table
from l2rclip.models.checkpoint import ModelFileError, load_model, save_model
from l2rclip.ranks import RankSpace
from l2rclip.serving.predictor import Predictor, expand_inputs, resolve_model_dir, write_table
from l2rclip.serving.pyfunc import predict_frame


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, n_per_rank=2, image_size=64)
    return root


@pytest.fixture(scope="module")
def predictor(model_dir) -> Predictor:
    return Predictor.load(model_dir, device="cpu")


def evaluate_stage_predictions(model_dir: Path, paths: list[Path]) -> pd.DataFrame:
    """What the evaluate stage computes for these images (its loader, model and table code)."""
    model, meta = load_model(model_dir)
    model.cache_prototypes()
    table = pd.DataFrame({"path": [str(p) for p in paths], "rank": 0})
    loader = make_loader(RankImageDataset(table, "/", meta["preprocess"]), 4, shuffle=False)
    probs = predict_probabilities(model, ({"images": images} for images, _ in loader), torch.device("cpu"))
    return predictions_table(table[["path"]], probs, meta["rank_space"])


def test_folder_with_bad_inputs_keeps_order_and_matches_evaluate(predictor, model_dir, demo_root, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = tmp_path / "missing.jpg"
    paths = expand_inputs(
        [
            str(demo_root / "images" / "03"),
            str(corrupt),
            str(missing),
            str(demo_root / "images" / "01" / "0001.png"),
        ]
    )
    assert paths[:2] == sorted((demo_root / "images" / "03").glob("*.png")) and len(paths) == 5

    out = predictor.predict_paths(paths, batch_size=2, with_probabilities=True, progress=False)

    assert out["path"].tolist() == [str(p) for p in paths]
    bad = out["error"] != ""
    assert bad.tolist() == [False, False, True, True, False]
    assert "corrupt.png" in out.loc[2, "error"] and "missing.jpg" in out.loc[3, "error"]
    assert [c for c in out.columns if c.startswith("p_")] == PROBABILITIES
    assert out.loc[bad, NUMBERS + ["p_1"]].isna().all().all()
    good = [p for p, b in zip(paths, bad, strict=True) if not b]
    expected = evaluate_stage_predictions(model_dir, good)
    found = out[~bad].reset_index(drop=True)
    assert (
        found["pred_label"].tolist() == expected["pred_label"].tolist()
        and found["pred_name"].tolist() == expected["pred_name"].tolist()
    )
    columns = NUMBERS + PROBABILITIES
    np.testing.assert_allclose(found[columns].to_numpy(float), expected[columns].to_numpy(float), atol=1e-6)


def test_folder_entries_that_are_not_images_get_their_reason_on_their_row(predictor, demo_root, tmp_path):
    shutil.copytree(demo_root / "images" / "02", tmp_path / "in")
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "anim.gif")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "gone.png").symlink_to(tmp_path / "in" / "deleted.png")
    (tmp_path / "in" / "loop.png").symlink_to(tmp_path / "in" / "loop.png")
    before = sorted(p.name for p in (tmp_path / "in").iterdir())
    out = predictor.predict_paths(expand_inputs([str(tmp_path / "in")]), progress=False).set_index("path")
    reasons = {Path(path).name: error.split(": ")[1] for path, error in out["error"].items() if error}
    assert reasons == {
        "anim.gif": "unsupported_extension",
        "notes.txt": "unsupported_extension",
        "gone.png": "dangling_symlink",
        "loop.png": "symlink_loop",
    }
    assert out["pred_rank"].notna().sum() == len(list((demo_root / "images" / "02").iterdir()))
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == before


def test_every_input_bad_and_no_input(predictor, tmp_path):
    out = predictor.predict_paths([tmp_path / "a.png", tmp_path / "b.png"], progress=False)
    assert len(out) == 2 and (out["error"] != "").all() and out["pred_rank"].isna().all()
    assert predictor.predict_paths([], progress=False).empty


def test_workers_and_in_memory_images_give_the_same_numbers(predictor, demo_root):
    paths = sorted((demo_root / "images").rglob("*.png"))[:6]
    base = predictor.predict_paths(paths, batch_size=4, progress=False)
    workers = predictor.predict_paths(paths, batch_size=4, num_workers=2, progress=False)
    images = predictor.predict_images([load_rgb(p) for p in paths])
    for other in (workers, images):
        np.testing.assert_allclose(other[NUMBERS].to_numpy(float), base[NUMBERS].to_numpy(float), atol=1e-6)
    assert images["path"].tolist() == [f"image[{i}]" for i in range(6)]


def test_csv_input_resolves_relative_paths(demo_root, tmp_path):
    listing = demo_root / "some.csv"
    pd.DataFrame({"path": ["images/02/0000.png", "images/05/0001.png"], "note": ["a", "b"]}).to_csv(
        listing, index=False
    )
    assert expand_inputs([str(listing)]) == [demo_root / "images/02/0000.png", demo_root / "images/05/0001.png"]
    wrong = tmp_path / "wrong.csv"
    pd.DataFrame({"file": ["x.png"], "label": [1]}).to_csv(wrong, index=False)
    with pytest.raises(ValueError, match=r"wrong.csv: expected a CSV with a `path` column; found columns file, l"):
        expand_inputs([str(wrong)])


def test_resolve_model_dir_finds_the_model_or_says_what_is_missing(model_dir, tmp_path):
    assert resolve_model_dir(str(model_dir)) == model_dir
    nested = tmp_path / "downloaded" / "artifacts" / "l2rclip-model"
    nested.mkdir(parents=True)
    for name in ("model.json", "model.safetensors"):
        (nested / name).write_bytes((model_dir / name).read_bytes())
    assert resolve_model_dir(str(tmp_path / "downloaded")) == nested
    with pytest.raises(ModelFileError, match=r"nowhere: expected an l2rclip model folder .* nothing exists"):
        resolve_model_dir("nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="found none under"):
        resolve_model_dir(str(tmp_path / "empty"))


def test_cli_writes_the_csv(model_dir, demo_root, tmp_path, capsys):
    out = tmp_path / "out" / "predictions.csv"
    code = cli.main(
        [
            "predict",
            str(model_dir),
            str(demo_root / "images" / "04"),
            str(tmp_path / "gone.png"),
            "--out",
            str(out),
            "--probabilities",
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert code == cli.EXIT_SOME_FAILED  # one input is missing
    table = pd.read_csv(out, keep_default_na=False)
    assert len(table) == 3 and table["error"].astype(bool).tolist() == [False, False, True]
    assert [c for c in table.columns if c.startswith("p_")] == PROBABILITIES
    assert f"predicted 2 of 3 images (1 errors) -> {out}" in capsys.readouterr().out
    assert cli.main(["predict", str(tmp_path / "no-model"), str(demo_root), "--out", str(out)]) == 2
    assert "no-model: expected an l2rclip model folder" in capsys.readouterr().err


def test_one_pixel_limit_in_prepare_predict_and_serving(model_dir, tmp_path, monkeypatch):
    """The same limit and message everywhere; before, 89.5 Mpx in prepare, 179 Mpx in predict/serving."""

    (tmp_path / "bomb.png").write_bytes(png_header_only(10_000, 10_000))  # 100 Mpx, only its header
    Image.new("RGB", (101, 100)).save(tmp_path / "wide.png")
    table = pd.DataFrame({"path": ["bomb.png", "wide.png"], "label": [1, 2]})
    encoded = [base64.b64encode((tmp_path / name).read_bytes()).decode() for name in table["path"]]
    too_large = {"bomb.png": "10000x10000 = 100000000 pixels, more than the limit data.max_image_pixels = "}
    for limit, refused in ((DEFAULT_MAX_PIXELS, ["bomb.png"]), (10_000, ["bomb.png", "wide.png"])):
        predictor = Predictor.load(model_dir, device="cpu", max_pixels=limit)
        _, report = validate_table(table, tmp_path, RankSpace(range(1, 11)), max_pixels=limit)
        predicted = predictor.predict_paths([tmp_path / name for name in table["path"]], progress=False)
        served = predict_frame(predictor, pd.DataFrame({"image": encoded}))
        assert report["path"].tolist() == refused and set(report["reason"]) == {"decompression_bomb"}
        expected = [f"ImageTooLargeError: {detail}" for detail in report["detail"]]
        assert expected[0] == f"ImageTooLargeError: {too_large['bomb.png']}{limit}"
        assert [e for e in predicted["error"] if e] == expected == [e for e in served["error"] if e]
    assert served.loc[1, "error"].endswith(
        "101x100 = 10100 pixels, more than the limit data.max_image_pixels = 10000"
    )

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    (tmp_path / "vast.png").write_bytes(png_header_only(20_000, 20_000))  # 400 Mpx: over PIL's own error limit
    with pytest.raises(OSError, match="truncated|cannot"):  # admitted by a higher limit: fails on its missing data
        load_rgb(tmp_path / "vast.png", max_pixels=500_000_000)


def test_cli_exit_status_says_whether_anything_was_predicted(model_dir, demo_root, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    good = str(demo_root / "images" / "04" / "0000.png")
    common = ["--out", str(out), "--device", "cpu"]

    assert cli.main(["predict", str(model_dir), str(tmp_path / "a.png"), str(tmp_path / "b.png"), *common]) == 4
    err = capsys.readouterr().err
    assert f"no input could be predicted; e.g. {tmp_path / 'a.png'}: UnusableImageError: missing_file" in err
    assert pd.read_csv(out, keep_default_na=False)["error"].astype(bool).all()  # the reasons are kept

    some_bad = ["predict", str(model_dir), good, str(tmp_path / "a.png"), *common]
    assert cli.main(some_bad) == 3 == cli.EXIT_SOME_FAILED
    assert "warning: 1 of 2 inputs could not be read; e.g." in capsys.readouterr().err
    assert cli.main(["predict", str(model_dir), good, *common]) == 0
    assert pd.read_csv(out, keep_default_na=False)["error"].tolist() == [""]
    assert "exit status: 0 every input predicted; 3 " in " ".join(
        cli.build_parser()._subparsers._group_actions[0].choices["predict"].format_help().split()
    )


def test_cli_checks_out_before_any_work_and_names_bad_csv_lists(model_dir, demo_root, tmp_path, capsys):
    good = str(demo_root / "images" / "04" / "0000.png")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "kept.csv").write_text("path\nx.png\n")
    before = (tmp_path / "kept.csv").read_bytes()
    cases = {
        str(tmp_path / "a_file" / "sub" / "p.csv"): f"{tmp_path / 'a_file'} is a file, not a folder",
        str(tmp_path): "expected a file name, found a folder",
        str(tmp_path / "kept.csv"): "it is one of the inputs, which would be overwritten",
    }
    for out, why in cases.items():
        assert cli.main(["predict", str(model_dir), good, str(tmp_path / "kept.csv"), "--out", out]) == 2
        err = capsys.readouterr()
        assert f"error: cannot write the predictions to {out}: {why}" in err.err and "predicting" not in err.err
    assert (tmp_path / "kept.csv").read_bytes() == before and not (tmp_path / "a_file").is_dir()

    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00path\n\x81")
    for name, found in (("empty.csv", "found an empty file"), ("binary.csv", "found unreadable text")):
        with pytest.raises(ValueError, match=rf"{name}: expected a CSV with a `path` column; {found}"):
            expand_inputs([str(tmp_path / name)])
        assert cli.main(["predict", str(model_dir), str(tmp_path / name), "--out", str(tmp_path / "o.csv")]) == 2
        assert f"error: {tmp_path / name}: expected a CSV" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: permissions cannot fail here")
def test_cli_refuses_an_unwritable_out_folder(model_dir, demo_root, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    out = locked / "p.csv"
    assert cli.main(["predict", str(model_dir), str(demo_root / "images"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the predictions to {out}: no permission to create files in {locked}" in err


def test_write_table_replaces_the_old_file_only_when_complete(tmp_path, monkeypatch):
    out = tmp_path / "p.csv"
    out.write_text("old\n")

    def broken(self, path, **kwargs):
        Path(path).write_text("half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(OSError, match="No space left"):
        write_table(pd.DataFrame({"path": ["a"]}), out)
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]


@pytest.mark.parametrize(
    ("recorded", "caveat"),
    [
        ({"is_clip": False}, "PIPELINE CHECK (random-initialised backbone"),  # older metadata: is_clip only
        ({"is_clip": False, "backbone_kind": "demo"}, "DEMO CLIP (pretrained on drawn shapes only"),
        ({"is_clip": True, "backbone_kind": "clip"}, None),
    ],
)
def test_loading_a_model_names_the_weights_its_predictions_come_from(recorded, caveat, tmp_path, caplog):
    _, model, config = tiny_l2rclip()
    folder = save_model(model, tmp_path / "model", config, RankSpace(list(range(1, 11))), extra=recorded)
    with caplog.at_level("WARNING", logger="l2rclip"):
        Predictor.load(folder)
    warned = [r.getMessage() for r in caplog.records if r.name == "l2rclip.serving.predictor"]
    assert [f"{folder}: {caveat}" in message for message in warned] == ([True] if caveat else []), warned
