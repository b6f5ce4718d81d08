"""Backbone loading: random init warns, local files load, tags fail fast and clearly offline."""

import time
import warnings

import pytest
import torch
from safetensors.torch import save_file

from l2rclip.models import backbone as backbone_module
from l2rclip.models.backbone import TINY_ARCH, WeightsUnavailableError, load_backbone


def test_none_weights_warn_that_this_is_not_clip():
    with pytest.warns(UserWarning, match="NOT CLIP"):
        loaded = load_backbone(TINY_ARCH, "none")
    assert not loaded.is_clip
    assert loaded.preprocess_eval is not None and loaded.tokenizer is not None
    assert not loaded.model.logit_scale.requires_grad
    assert all(p.requires_grad for p in loaded.model.visual.parameters())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_file_is_loaded(tmp_path, suffix):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        source = load_backbone(TINY_ARCH, "none").model
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    torch.manual_seed(2)
    loaded = load_backbone(TINY_ARCH, str(path))
    assert loaded.is_clip
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_tag_offline_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(backbone_module, "_tag_is_cached", lambda cfg: False)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as error:
        load_backbone("ViT-B-16", "openai")
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert "HF_HUB_OFFLINE" in message and "model.pretrained" in message and "none" in message


def test_tag_with_unreachable_host_fails_fast(monkeypatch):
    """Not declared offline, but the host does not answer: a quick probe, no retries, no download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(backbone_module, "_tag_is_cached", lambda cfg: False)
    monkeypatch.setattr(backbone_module, "_HF_HOST", "127.0.0.1")  # nothing listens on :443 here
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="cannot be reached"):
        load_backbone("ViT-B-16", "openai")
    assert time.monotonic() - start < 10


def test_unknown_tag_and_arch_are_clear_errors():
    with pytest.raises(ValueError, match="neither a weights file nor a tag"):
        load_backbone(TINY_ARCH, "no-such-tag")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_backbone("ViT-Nope", "none")
