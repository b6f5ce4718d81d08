"""The preprocess stage's image store: same pixels as the files, seeded augmentation, DVC reruns."""

import shutil
import warnings

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from support.models import tiny_l2rclip
from support.project import ROOT, copy_project, environment, run, stages_run

from l2rclip.config import Params, from_dict
from l2rclip.data.batch_transforms import crop_boxes, store_eval_batches
from l2rclip.data.dataset import RankImageDataset, make_loader
from l2rclip.data.demo import generate_demo
from l2rclip.data.store import ImageStore, StoreError, geometric_transform, open_store, spec_for
from l2rclip.evaluation.predictions import predict_probabilities
from l2rclip.models.backbone import TINY_ARCH, load_backbone
from l2rclip.models.recipe import resolve_recipe
from l2rclip.stages.prepare import prepare
from l2rclip.stages.preprocess import preprocess
from l2rclip.training.loop import StoreBatches


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    params = from_dict(
        Params,
        {
            "folds": [0, 1],
            "data": {"root": str(tmp / "demo"), "demo": {"n_per_rank": 6, "image_size": 96}},
            "split": {"n_folds": 2, "val_fraction": 0.0},
            "preprocess": {"shard_size": 16},  # several shards even for 60 images
            "model": {"arch": TINY_ARCH, "pretrained": "none"},
        },
    )
    generate_demo(tmp / "demo", n_per_rank=6, image_size=96)
    prepare(params, tmp / "prepared")
    preprocess(params, tmp / "prepared", tmp / "store")
    return params, tmp


def tiny_model():
    backbone, model, _ = tiny_l2rclip(10, "the number of")
    return backbone, model


def test_spec_comes_from_open_clip_configs_without_loading_weights():
    spec = spec_for(resolve_recipe(TINY_ARCH, "none"), 0.0)
    assert (spec.image_size, spec.side, spec.interpolation, spec.resize_mode) == (64, 64, "bicubic", "shortest")
    assert spec_for(resolve_recipe("ViT-B-16", "openai"), 0.14).side == 255
    assert spec_for(resolve_recipe("ViT-B-16", "none"), 0).image_size == 224
    laion = spec_for(resolve_recipe("ViT-L-14", "laion2b_s32b_b82k"), 0)
    assert laion.mean == (0.5, 0.5, 0.5) and laion.std == (0.5, 0.5, 0.5)  # the tag's, not OpenAI's
    backbone, _ = tiny_model()
    model_cfg = open_clip.get_model_preprocess_cfg(backbone.model)  # what the loaded model itself says
    assert (model_cfg["mean"], model_cfg["std"], model_cfg["interpolation"]) == (
        spec.mean,
        spec.std,
        spec.interpolation,
    )
    with pytest.raises(StoreError, match="preprocess.margin"):
        spec_for(resolve_recipe(TINY_ARCH, "none"), -0.1)


@pytest.mark.parametrize(("arch", "tag"), [("ViT-L-14-CLIPA", "datacomp1b"), ("ViT-H-14", "dfn5b")])
def test_squash_resizing_tags_can_be_stored(arch, tag, tmp_path):
    """Tags that squash instead of cropping (CLIPA, DFN): the store keeps every geometric step."""
    spec = spec_for(resolve_recipe(arch, tag), 0.0)
    assert spec.resize_mode == "squash"
    steps = geometric_transform(spec).transforms
    assert len(steps) == 1 and list(steps[0].size) == [spec.image_size] * 2
    image = Image.new("RGB", (300, 120), (10, 200, 30))
    assert geometric_transform(spec)(image).size == (spec.image_size, spec.image_size)


def test_evaluation_from_the_store_equals_evaluation_from_the_files(demo_store):
    params, tmp = demo_store
    backbone, model = tiny_model()
    store = open_store(tmp / "store", backbone.recipe, 0.0)
    table = pd_images(tmp)
    assert len(store.shard_files) == 4  # 60 images in shards of 16
    files = make_loader(RankImageDataset(table, tmp / "demo", backbone.preprocess_eval), 8, shuffle=False)
    from_files = torch.cat([images for images, _ in files])
    from_store = torch.cat(list(store_eval_batches(table, store, 8, 0, torch.device("cpu"))))
    assert torch.equal(from_files, from_store)  # the same floats: margin 0 stores the transform's pixels
    p_files = predict_probabilities(model, ({"images": b} for b in from_files.split(8)), torch.device("cpu"))
    p_store = predict_probabilities(model, ({"images": b} for b in from_store.split(8)), torch.device("cpu"))
    assert (p_files.argmax(1) == p_store.argmax(1)).all() and np.abs(p_files - p_store).max() <= 1e-6


def pd_images(tmp):
    return pd.read_csv(tmp / "prepared/images.csv", keep_default_na=False)


def test_training_batches_are_seeded_crops_whatever_the_workers(demo_store):
    params, tmp = demo_store
    store = ImageStore(tmp / "store")
    table = pd_images(tmp)
    one = [(b["images"], y) for b, y in StoreBatches(table, store, params.train, 3, torch.device("cpu")).epoch(2)]
    train = params.train.__class__(**{**params.train.__dict__, "num_workers": 2})
    two = [(b["images"], y) for b, y in StoreBatches(table, store, train, 3, torch.device("cpu")).epoch(2)]
    assert len(one) == len(two) == -(-60 // params.train.batch_size)
    for (a, ya), (b, yb) in zip(one, two, strict=True):
        assert torch.equal(ya, yb) and torch.allclose(a, b)
        assert a.shape[1:] == (3, 64, 64)
    other = next(StoreBatches(table, store, params.train, 3, torch.device("cpu")).epoch(3))[0]["images"]
    assert not torch.equal(other, one[0][0])  # another epoch: another order and other crops
    boxes = crop_boxes(1000, 64, torch.Generator().manual_seed(0))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 64**2
    assert (boxes >= 0).all() and (boxes <= 64).all() and areas.min() >= 0.9 * 0.75 and areas.max() <= 1.0 + 1e-6


def test_a_store_for_another_geometry_is_refused_and_names_the_fix(demo_store):
    _, tmp = demo_store
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = load_backbone("ViT-B-32", "none")  # 224 px input
    with pytest.raises(StoreError, match="dvc repro preprocess"):
        open_store(tmp / "store", big.recipe, 0.0)
    with pytest.raises(StoreError, match="not in the store"):
        ImageStore(tmp / "store").rows(["images/none.png"])


def test_dvc_reruns_preprocess_for_the_backbone_geometry_not_for_training_settings(tmp_path):
    env = environment(tmp_path)
    repo = copy_project(
        tmp_path / "repo",
        {
            "data": {"demo": {"n_per_rank": 8, "image_size": 64}},
            "folds": [0, 1],
            "tracking": {"enabled": False},
            "split": {"n_folds": 2, "val_fraction": 0.25, "calib_fraction": 0},
        },
    )
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    run(["git", "init", "-q"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    assert stages_run(run(["dvc", "repro", "preprocess"], repo, env)) == {"demo", "prepare", "preprocess"}

    def set_params(**changes):
        params = yaml.safe_load((repo / "params.yaml").read_text())
        for key, value in changes.items():
            section, name = key.split("__")
            params[section][name] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    set_params(train__batch_size=8, train__epochs=3)
    assert stages_run(run(["dvc", "repro", "preprocess"], repo, env)) == set()
    set_params(model__arch="ViT-B-32", model__pretrained="none")  # a 224 px backbone
    assert stages_run(run(["dvc", "repro", "preprocess"], repo, env)) == {"preprocess"}
    assert ImageStore(repo / "outputs/preprocess").spec.side == 224
