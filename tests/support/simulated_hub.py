"""A simulated connected user: a private Hugging Face cache holding random CLIP weights.

open_clip finds a tag's weights in the Hugging Face cache under the repo and file names of the
tag's pretrained config (ViT-B-16 `openai`: repo `timm/vit_base_patch16_clip_224.openai`, file
`open_clip_model.safetensors`). `SimulatedHub` writes random weights of the architecture exactly
there (`models--<org>--<name>/snapshots/<commit>/<file>` plus `refs/main`), in a cache of its own,
with `HF_HUB_OFFLINE=1`, so the real tag code path (cache lookup, the tag's quick_gelu and its
preprocessing) runs without any network. Used by the fixtures in conftest.py; imports no l2rclip
code, so a test using it can run against any version of the package.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from open_clip import pretrained as open_clip_pretrained
from safetensors.torch import save_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the snapshot's (fake) revision
HF_WEIGHTS = "open_clip_model.safetensors"  # open_clip's first choice for an "org/name/" hub entry

# A tiny architecture whose own config says GELU, so that a tag's quick_gelu changes the network.
TINY_GELU_ARCH = "L2RCLIP-Tiny-GELU-test"
TINY_GELU_CONFIG = {
    "embed_dim": 64,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# Two tags of it, registered like open_clip's own: one trained with QuickGELU (OpenAI's
# preprocessing), one with LAION-style preprocessing (mean/std 0.5, bilinear, GELU).
QUICK_GELU_TAG = "sim_quickgelu"
LAION_STYLE_TAG = "sim_laion"
TINY_TAGS = {
    QUICK_GELU_TAG: {
        "url": "",
        "hf_hub": "l2rclip-test/tiny-quickgelu/",
        "quick_gelu": True,
        "mean": open_clip.OPENAI_DATASET_MEAN,
        "std": open_clip.OPENAI_DATASET_STD,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
    LAION_STYLE_TAG: {
        "url": "",
        "hf_hub": "l2rclip-test/tiny-laion/",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bilinear",
        "resize_mode": "shortest",
    },
}


class SimulatedHub:
    """A private Hugging Face cache at `root` that `add` fills with random weights of a tag."""

    def __init__(self, root: Path):
        self.root = root

    def repo_and_file(self, arch: str, tag: str) -> tuple[str, str]:
        """The Hugging Face repo and file open_clip looks up for `arch`/`tag`."""
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        if not cfg.get("hf_hub"):
            raise ValueError(f"{arch}/{tag}: expected a tag with a Hugging Face hub entry, found {cfg}")
        repo, filename = os.path.split(cfg["hf_hub"])
        return repo, filename or HF_WEIGHTS

    def add(self, arch: str, tag: str, seed: int = 0) -> Path:
        """Write random `arch` weights where open_clip finds the weights of `tag`; returns the file."""
        repo, filename = self.repo_and_file(arch, tag)
        repo_dir = self.root / "hub" / f"models--{repo.replace('/', '--')}"
        snapshot = repo_dir / "snapshots" / COMMIT
        snapshot.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(COMMIT)
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = open_clip.create_model(arch)  # random init; the activation has no weights
        state = {name: value.detach().contiguous().clone() for name, value in model.state_dict().items()}
        path = snapshot / filename
        save_file(state, path)
        return path


def install(root: Path, monkeypatch: pytest.MonkeyPatch) -> SimulatedHub:
    """Point the Hugging Face libraries at a fresh private cache under `root`, offline."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HOME", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The constants are read when huggingface_hub is imported, i.e. before this fixture.
    monkeypatch.setattr(hub_constants, "HF_HOME", str(root))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    (root / "hub").mkdir(parents=True, exist_ok=True)
    return SimulatedHub(root)


def register_tiny_tags(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Register `TINY_GELU_ARCH` with open_clip (public API) and its tags in open_clip's tag registry."""
    if TINY_GELU_ARCH not in open_clip.list_models():
        path = config_dir / f"{TINY_GELU_ARCH}.json"
        path.write_text(json.dumps(TINY_GELU_CONFIG))
        open_clip.add_model_config(path)
    monkeypatch.setitem(open_clip_pretrained._PRETRAINED, TINY_GELU_ARCH, dict(TINY_TAGS))
    return TINY_TAGS
