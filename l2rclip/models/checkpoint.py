"""Saving and loading an L2RCLIP model: safetensors weights + a JSON of config and RankSpace.

A saved model is self-contained: the weights file holds the image tower, the frozen text tower,
the prompts, the RankFormer and (when cached) the prototypes, so loading rebuilds the
architecture with random weights and overwrites them. No download, no pickle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from l2rclip.config import ConfigError, ModelConfig, from_dict, to_dict
from l2rclip.models.backbone import load_backbone
from l2rclip.models.factory import build_model
from l2rclip.models.heads import OrdinalHeadModel
from l2rclip.models.l2rclip import L2RCLIP
from l2rclip.ranks import RankSpace

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
FORMAT = "l2rclip-model"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A model folder that is missing, incomplete or not an l2rclip model."""


class _RandomInitNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded for model ... initialized randomly".

    open_clip logs it on the root logger; it is false while loading a saved model, whose trained
    weights overwrite the random init.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _random_init_notice_dropped():
    """Only around rebuilding a saved model: a run that really starts from random init keeps the notice."""
    notice, root = _RandomInitNotice(), logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def save_model(model: L2RCLIP | OrdinalHeadModel, folder: str | Path, config: ModelConfig, rank_space: RankSpace,
               extra: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` and `model.json` into `folder` (created if needed).

    Args:
        model: the model; its prototype cache, when filled, is saved with it.
        folder: destination folder.
        config: the `model` section it was built from.
        rank_space: its ranks.
        extra: more JSON-serialisable metadata (epoch, metrics, is_clip...).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Shared storage (positional embedding seen from two modules) must be cloned for safetensors.
    state = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    save_file(state, folder / WEIGHTS_FILE, metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": to_dict(config),
            "ranks": rank_space.to_dict(), **(extra or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def read_model_meta(folder: str | Path) -> dict[str, Any]:
    """Read and check `model.json`, naming what is wrong with a folder that is not a model."""
    folder = Path(folder)
    meta_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise ModelFileError(f"{folder}: expected an l2rclip model folder with {CONFIG_FILE} and "
                                 f"{WEIGHTS_FILE}; {path.name} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{meta_path}: expected JSON model metadata, found unreadable text "
                             f"({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ModelFileError(f"{meta_path}: expected format {FORMAT!r}, found {found!r}")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ModelFileError(f"{meta_path}: model format version {meta['version']} is newer than this "
                             f"l2rclip understands ({FORMAT_VERSION}); upgrade l2rclip")
    return meta


def load_model(folder: str | Path,
               device: str | torch.device = "cpu") -> tuple[L2RCLIP | OrdinalHeadModel, dict[str, Any]]:
    """Rebuild a saved model; returns the model (in eval mode) and its metadata.

    Raises:
        ModelFileError: the folder is not a complete l2rclip model, or its weights do not fit.
    """
    folder = Path(folder)
    meta = read_model_meta(folder)
    try:
        config = from_dict(ModelConfig, meta["model"], "model")
        rank_space = RankSpace.from_dict(meta["ranks"])
    except (ConfigError, KeyError, ValueError) as error:
        raise ModelFileError(f"{folder / CONFIG_FILE}: model metadata is invalid: {error}") from None
    try:
        state = load_file(folder / WEIGHTS_FILE, device=str(device))
    except (SafetensorError, OSError) as error:
        raise ModelFileError(f"{folder / WEIGHTS_FILE}: expected a safetensors weights file, "
                             f"found something else ({error})") from None
    with warnings.catch_warnings(), _random_init_notice_dropped():
        warnings.simplefilter("ignore")  # random init is overwritten by the saved weights below
        backbone = load_backbone(config.arch, "none", device=device)
    model = build_model(backbone, rank_space, config).to(device)
    if "cached_prototypes" in state:  # its size is only known from the file
        model.cached_prototypes = state["cached_prototypes"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelFileError(f"{folder / WEIGHTS_FILE}: weights do not fit the {config.arch} model "
                             f"described in {CONFIG_FILE}: {str(error)[:500]}") from None
    model.eval()
    return model, {**meta, "rank_space": rank_space, "config": config,
                   "preprocess": backbone.preprocess_eval}
