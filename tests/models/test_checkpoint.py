"""Saved models reload exactly, cached prototypes included; wrong files are clear errors."""

import json
import logging
import warnings

import pytest
import torch

from l2rclip.config import ModelConfig, PromptConfig, RankFormerConfig
from l2rclip.models.backbone import TINY_ARCH, load_backbone
from l2rclip.models.checkpoint import ModelFileError, load_model, save_model
from l2rclip.models.factory import build_l2rclip
from l2rclip.ranks import RankSpace

CONFIG = ModelConfig(
    arch=TINY_ARCH,
    pretrained="none",
    prompt=PromptConfig(context_init="a photo of"),
    rankformer=RankFormerConfig(rank_position=True),
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(TINY_ARCH, "none")
    space = RankSpace([1930, 1940, 1950, 1960], names=["1930s", "1940s", "1950s", "1960s"])
    model = build_l2rclip(backbone, space, CONFIG)
    with torch.no_grad():
        for param in model.rankformer.parameters():  # move away from the identity start
            param.add_(0.01 * torch.randn_like(param))
    model.eval().cache_prototypes()
    folder = save_model(model, tmp_path_factory.mktemp("model"), CONFIG, space, extra={"epoch": 3})
    return model, space, folder


def test_round_trip_is_exact(saved):
    model, space, folder = saved
    loaded, meta = load_model(folder)
    assert meta["epoch"] == 3 and meta["rank_space"] == space and meta["config"] == CONFIG
    assert torch.equal(loaded.cached_prototypes, model.cached_prototypes)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images)["logits"], model(images)["logits"])
        assert torch.allclose(loaded.compute_prototypes(), model.cached_prototypes, atol=1e-6)


def test_missing_and_wrong_kind_of_files(saved, tmp_path):
    _, _, folder = saved
    with pytest.raises(ModelFileError, match="model.json is missing"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format": "something-else"}))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelFileError, match="expected format 'l2rclip-model'"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text((folder / "model.json").read_text())
    with pytest.raises(ModelFileError, match="expected a safetensors weights file"):
        load_model(tmp_path)


def test_weights_of_another_architecture(saved, tmp_path):
    _, _, folder = saved
    meta = json.loads((folder / "model.json").read_text())
    meta["model"]["rankformer"]["enabled"] = False
    (tmp_path / "model.json").write_text(json.dumps(meta))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ModelFileError, match="weights do not fit"):
        load_model(tmp_path)


RANDOM_INIT_NOTICE = "No pretrained weights loaded for model"


def test_loading_a_saved_model_does_not_claim_random_init(saved, caplog):
    _, _, folder = saved
    filters = list(logging.getLogger().filters)
    with caplog.at_level(logging.WARNING):
        load_model(folder)
    assert not [r for r in caplog.records if r.getMessage().startswith(RANDOM_INIT_NOTICE)]
    assert logging.getLogger().filters == filters  # dropped only while loading, not for later random inits


def test_a_fresh_random_backbone_still_says_so(caplog):
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_backbone(TINY_ARCH, "none")
    assert [r for r in caplog.records if r.getMessage().startswith(RANDOM_INIT_NOTICE)]
