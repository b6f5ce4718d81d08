"""The frozen tower's feature cache as evaluation and calibration read it back."""

import pandas as pd
import torch
from support.models import tiny_l2rclip

from l2rclip.data.demo import generate_demo
from l2rclip.training.features import cached_image_features, read_feature_cache, rows_of


def demo_table(root):
    generate_demo(root, n_per_rank=1, image_size=64)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))[:6]
    return pd.DataFrame({"path": paths, "rank": range(len(paths))})


def test_a_split_reads_its_rows_of_what_training_encoded(tmp_path):
    images = demo_table(tmp_path / "demo")
    _, model, _ = tiny_l2rclip()
    transform = model.recipe.preprocess.transform(False)
    args = (tmp_path / "demo", transform, tmp_path / "cache")
    assert read_feature_cache(model, images, *args) is None  # nothing cached: the stage encodes itself
    encoded = cached_image_features(model, images, *args, torch.device("cpu"))  # (6, E), as training writes it
    cached = read_feature_cache(model, images, *args)
    assert cached is not None and torch.equal(cached, encoded)
    split = images.iloc[[4, 1, 3]]
    assert torch.equal(rows_of(cached, images, split), encoded[[4, 1, 3]])  # the split's order, not the table's


def test_a_fine_tuned_tower_never_reads_the_frozen_towers_features(tmp_path):
    images = demo_table(tmp_path / "demo")
    _, model, _ = tiny_l2rclip()
    args = (tmp_path / "demo", model.recipe.preprocess.transform(False), tmp_path / "cache")
    cached_image_features(model, images, *args, torch.device("cpu"))
    with torch.no_grad():
        next(model.image_encoder.parameters()).add_(0.01)  # one step of fine-tuning
    assert read_feature_cache(model, images, *args) is None
    assert read_feature_cache(model, images.iloc[:3], *args) is None  # another table: another key
