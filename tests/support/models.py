"""Tiny saved models and a session MLflow store for serving, registry and prediction tests."""

import os
import warnings
from pathlib import Path

import pytest
import torch

from l2rclip.config import ModelConfig, PromptConfig
from l2rclip.data.demo import generate_demo
from l2rclip.models.backbone import TINY_ARCH, Backbone, load_backbone
from l2rclip.models.checkpoint import save_model
from l2rclip.models.factory import build_l2rclip
from l2rclip.models.l2rclip import L2RCLIP
from l2rclip.ranks import RankSpace
from l2rclip.serving.predictor import Predictor
from l2rclip.serving.pyfunc import RequestLimits, log_pyfunc
from l2rclip.tracking.runs import Tracker

NUMBERS = ["pred_rank", "pred_value", "expected_value", "std", "entropy", "confidence"]


PROBABILITIES = [f"p_{count}" for count in range(1, 11)]  # named by label: the tiny model's ranks are counts 1..10


def tiny_l2rclip(
    n_ranks: int = 10,
    context_init: str = "the number of shapes is",
    arch: str = TINY_ARCH,
    pretrained: str = "none",
    seed: int = 0,
) -> tuple[Backbone, L2RCLIP, ModelConfig]:
    """A random L2RCLIP over ranks 1..n_ranks on a tiny backbone, in eval mode, with its config."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no weights for the tiny architecture: random, on purpose
        backbone = load_backbone(arch, pretrained)
    config = ModelConfig(arch=arch, pretrained=pretrained, prompt=PromptConfig(context_init=context_init))
    return backbone, build_l2rclip(backbone, RankSpace(list(range(1, n_ranks + 1))), config).eval(), config


def save_tiny_model(folder: Path) -> Path:
    """A random L2RCLIP-Tiny model over the demo's counts 1..10, saved without cached prototypes."""
    _, model, config = tiny_l2rclip()
    space = RankSpace(list(range(1, 11)))
    return save_model(model, folder, config, space, extra={"is_clip": False, "epoch": 1})


_STORES: dict[Path, str] = {}


def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite MLflow store per test session (creating its tables takes seconds), by its URI."""
    base = tmp_path_factory.getbasetemp()
    if base not in _STORES:
        _STORES[base] = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    return _STORES[base]


# Small enough to break in a test, large enough for the 64 x 64 demo images the tests send.
LIMITS = RequestLimits(max_rows=5, max_request_bytes=200_000, max_image_pixels=100 * 100)


def log_tiny_pyfunc(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny model logged as a pyfunc under a run of a fresh SQLite store, and a few demo images."""
    root = tmp_path_factory.mktemp("serving")
    uri = mlflow_store(tmp_path_factory)
    run_id = Tracker(uri, experiment="serving-test").parent_run("key", "demo pipeline", {}, {})
    model_dir = save_tiny_model(root / "model")
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    model_uri = log_pyfunc(model_dir, run_id, uri, limits=LIMITS)
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before  # the global switch was undone
    generate_demo(root / "demo", n_per_rank=1, image_size=64)
    paths = sorted((root / "demo").rglob("*.png"))[:3]
    expected = Predictor.load(model_dir).predict_paths(paths, with_probabilities=True, progress=False)
    return {"uri": uri, "run_id": run_id, "model_uri": model_uri, "paths": paths, "expected": expected}


def on_forward(monkeypatch: pytest.MonkeyPatch, action) -> list[int]:
    """Call `action(call_number)` (1-based) before every L2RCLIP forward pass; returns the calls made.

    An action that raises injects a failure at that batch, e.g. a `KeyboardInterrupt` (Ctrl+C)
    or a crash in the middle of a prediction run.
    """
    from l2rclip.models.l2rclip import L2RCLIP

    calls: list[int] = []
    forward = L2RCLIP.forward

    def wrapped(self, *args, **kwargs):
        calls.append(len(calls) + 1)
        action(calls[-1])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(L2RCLIP, "forward", wrapped)
    return calls
