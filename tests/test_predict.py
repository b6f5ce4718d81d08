"""Prediction: rows in input order, bad inputs on their own rows, the evaluate stage's numbers."""

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from l2rclip import cli
from l2rclip.config import ModelConfig, PromptConfig
from l2rclip.data.dataset import RankImageDataset, make_loader
from l2rclip.data.demo import generate_demo
from l2rclip.data.validate import load_rgb
from l2rclip.evaluation import predict_probabilities, predictions_table
from l2rclip.models.backbone import TINY_ARCH, load_backbone
from l2rclip.models.checkpoint import ModelFileError, load_model, save_model
from l2rclip.models.factory import build_l2rclip
from l2rclip.predict import Predictor, expand_inputs, resolve_model_dir
from l2rclip.ranks import RankSpace

NUMBERS = ["pred_rank", "pred_value", "expected_value", "std", "entropy", "confidence"]


def save_tiny_model(folder: Path) -> Path:
    """A random L2RCLIP-Tiny model over the demo's counts 1..10, saved without cached prototypes."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(TINY_ARCH, "none")
    config = ModelConfig(arch=TINY_ARCH, pretrained="none",
                         prompt=PromptConfig(context_init="the number of shapes is"))
    space = RankSpace(list(range(1, 11)))
    return save_model(build_l2rclip(backbone, space, config), folder, config, space,
                      extra={"is_clip": False, "epoch": 1})


_STORES: dict[Path, str] = {}


def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite MLflow store per test session (creating its tables takes seconds), by its URI."""
    base = tmp_path_factory.getbasetemp()
    if base not in _STORES:
        _STORES[base] = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    return _STORES[base]


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
    paths = expand_inputs([str(demo_root / "images" / "03"), str(corrupt), str(missing),
                           str(demo_root / "images" / "01" / "0001.png")])
    assert paths[:2] == sorted((demo_root / "images" / "03").glob("*.png")) and len(paths) == 5

    out = predictor.predict_paths(paths, batch_size=2, with_probabilities=True, progress=False)

    assert out["path"].tolist() == [str(p) for p in paths]
    bad = out["error"] != ""
    assert bad.tolist() == [False, False, True, True, False]
    assert "corrupt.png" in out.loc[2, "error"] and "missing.jpg" in out.loc[3, "error"]
    assert out.loc[bad, NUMBERS + ["p_0"]].isna().all().all()
    good = [p for p, b in zip(paths, bad, strict=True) if not b]
    expected = evaluate_stage_predictions(model_dir, good)
    found = out[~bad].reset_index(drop=True)
    assert (found["pred_label"].tolist() == expected["pred_label"].tolist()
            and found["pred_name"].tolist() == expected["pred_name"].tolist())
    columns = NUMBERS + [f"p_{k}" for k in range(10)]
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
    assert reasons == {"anim.gif": "unsupported_extension", "notes.txt": "unsupported_extension",
                       "gone.png": "dangling_symlink", "loop.png": "symlink_loop"}
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
        listing, index=False)
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
    code = cli.main(["predict", str(model_dir), str(demo_root / "images" / "04"), str(tmp_path / "gone.png"),
                     "--out", str(out), "--probabilities", "--batch-size", "2", "--device", "cpu"])
    assert code == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert len(table) == 3 and table["error"].astype(bool).tolist() == [False, False, True]
    assert {f"p_{k}" for k in range(10)} <= set(table.columns)
    assert f"predicted 2 of 3 images (1 errors) -> {out}" in capsys.readouterr().out
    assert cli.main(["predict", str(tmp_path / "no-model"), str(demo_root), "--out", str(out)]) == 2
    assert "no-model: expected an l2rclip model folder" in capsys.readouterr().err
