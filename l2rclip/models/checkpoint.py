"""Saving and loading an L2RCLIP model: safetensors weights + a JSON of config, RankSpace and recipe.

A saved model is self-contained: the weights file holds the image tower, the frozen text tower,
the prompts, the RankFormer and (when cached) the prototypes, and `model.json` holds the
backbone recipe (`l2rclip.models.recipe`: architecture, weights source, activation, image
preprocessing). Loading rebuilds exactly that network with random weights and overwrites them.
No download, no pickle, and never the original CLIP weights.

Format version 1 (before the recipe was stored) is upgraded on load with one warning: its recipe
is derived from the stored arch and pretrained through open_clip's pretrained config, which is
what training used. `upgrade_model` writes the derived recipe into the folder for good.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from l2rclip.config import ConfigError, ModelConfig, from_dict, to_dict
from l2rclip.models.backbone import build_backbone
from l2rclip.models.factory import build_model
from l2rclip.models.heads import OrdinalHeadModel
from l2rclip.models.l2rclip import L2RCLIP
from l2rclip.models.recipe import BackboneRecipe, RecipeError, check_model_config, recipe_of, resolve_recipe
from l2rclip.ranks import RankSpace

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
FORMAT = "l2rclip-model"
FORMAT_VERSION = 2  # 2: the backbone recipe is stored (`recipe`)


class ModelFileError(ValueError):
    """A model folder that is missing, incomplete or not an l2rclip model."""


_UPGRADE = "python -c \"from l2rclip.models.checkpoint import upgrade_model; upgrade_model('{folder}')\""


class LegacyModelWarning(UserWarning):
    """A model saved before the backbone recipe was stored; its recipe was derived on load."""


class _RandomInitNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded for model ... initialized randomly".

    open_clip logs it on the root logger; it is false while loading a saved model, whose trained
    weights overwrite the random init.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _random_init_notice_dropped() -> Iterator[None]:
    """Only around rebuilding a saved model: a run that really starts from random init keeps the notice."""
    notice, root = _RandomInitNotice(), logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def save_model(
    model: L2RCLIP | OrdinalHeadModel,
    folder: str | Path,
    config: ModelConfig,
    rank_space: RankSpace,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model.safetensors` and `model.json` into `folder` (created if needed).

    Args:
        model: the model (built by `build_model`, so it carries its backbone recipe, which is
            stored as `recipe`); its prototype cache, when filled, is saved with it.
        folder: destination folder.
        config: the `model` section it was built from.
        rank_space: its ranks.
        extra: more JSON-serialisable metadata (epoch, metrics, is_clip...).
    """
    recipe = recipe_of(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Shared storage (positional embedding seen from two modules) must be cloned for safetensors.
    state = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    save_file(state, folder / WEIGHTS_FILE, metadata={"format": FORMAT})
    meta = {
        **(extra or {}),
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": to_dict(config),
        "ranks": rank_space.to_dict(),
        "recipe": recipe.to_dict(),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def read_model_meta(folder: str | Path) -> dict[str, Any]:
    """Read and check `model.json`, naming what is wrong with a folder that is not a model."""
    folder = Path(folder)
    meta_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise ModelFileError(
                f"{folder}: expected an l2rclip model folder with {CONFIG_FILE} and "
                f"{WEIGHTS_FILE}; {path.name} is missing"
            )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFileError(
            f"{meta_path}: expected JSON model metadata, found unreadable text ({error})"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ModelFileError(f"{meta_path}: expected format {FORMAT!r}, found {found!r}")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ModelFileError(
            f"{meta_path}: model format version {meta['version']} is newer than this "
            f"l2rclip understands ({FORMAT_VERSION}); upgrade l2rclip"
        )
    return meta


def model_recipe(meta: dict[str, Any], config: ModelConfig, where: Path) -> BackboneRecipe:
    """The backbone recipe of a saved model: stored, or derived for a format-1 model (one warning).

    Raises:
        ModelFileError: the stored recipe is invalid or names another architecture than the config,
            or a format-1 model's recipe cannot be derived (the message says how to convert it).
    """
    if "recipe" in meta:
        try:
            recipe = BackboneRecipe.from_dict(meta["recipe"], f"{where}: recipe")
        except RecipeError as error:
            raise ModelFileError(str(error)) from None
        if recipe.arch != config.arch:
            raise ModelFileError(
                f"{where}: recipe.arch is {recipe.arch!r} but model.arch is {config.arch!r}; "
                "expected the same architecture"
            )
        return recipe
    try:  # format 1: training resolved this same (arch, pretrained) through open_clip's configs
        recipe = resolve_recipe(config.arch, config.pretrained, hash_file=False)
    except RecipeError as error:
        if not _looks_like_path(config.pretrained):
            raise ModelFileError(
                f"{where}: format version 1 model (no backbone recipe) whose recipe cannot be derived: {error}. "
                "Convert it where the open_clip that trained it is installed: "
                f"{_UPGRADE.format(folder=where.parent)}"
            ) from None
        # A weights file no longer here: open_clip gives files the default preprocessing.
        recipe = dataclasses.replace(
            resolve_recipe(config.arch, "none"),
            source="file",
            pretrained=config.pretrained,
            origin=config.pretrained,
        )
    warnings.warn(
        f"{where} is an l2rclip model of format version 1, without its backbone recipe; derived "
        f"it from model.arch {config.arch!r} and model.pretrained {config.pretrained!r} through "
        f"open_clip's pretrained config (quick_gelu={recipe.quick_gelu}, mean={recipe.preprocess.mean}, "
        f"std={recipe.preprocess.std}, interpolation={recipe.preprocess.interpolation}, "
        f"resize_mode={recipe.preprocess.resize_mode}), as training used them. To store it: "
        f"{_UPGRADE.format(folder=where.parent)}",
        LegacyModelWarning,
        stacklevel=3,
    )
    return recipe


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or Path(pretrained).suffix in (".bin", ".pt", ".pth", ".safetensors")


def upgrade_model(folder: str | Path) -> Path:
    """Write the derived backbone recipe into a format-1 model's `model.json` (weights untouched)."""
    folder = Path(folder)
    meta = read_model_meta(folder)
    if "recipe" in meta:
        return folder
    config = _read_config(meta, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyModelWarning)
        recipe = model_recipe(meta, config, folder / CONFIG_FILE)
    meta.update(version=FORMAT_VERSION, recipe=recipe.to_dict())
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def _read_config(meta: dict[str, Any], folder: Path) -> ModelConfig:
    try:
        return from_dict(ModelConfig, meta["model"], "model")
    except (ConfigError, KeyError, ValueError) as error:
        raise ModelFileError(f"{folder / CONFIG_FILE}: model metadata is invalid: {error}") from None


def load_model(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[L2RCLIP | OrdinalHeadModel, dict[str, Any]]:
    """Rebuild a saved model; returns the model (in eval mode) and its metadata.

    The metadata holds `rank_space`, `config`, `recipe` (the backbone recipe) and `preprocess`
    (the recipe's evaluation transform) besides what was saved.

    Raises:
        ModelFileError: the folder is not a complete l2rclip model, or its weights do not fit.
    """
    folder = Path(folder)
    meta = read_model_meta(folder)
    config = _read_config(meta, folder)
    try:
        rank_space = RankSpace.from_dict(meta["ranks"])
    except (KeyError, ValueError) as error:
        raise ModelFileError(f"{folder / CONFIG_FILE}: model metadata is invalid: {error}") from None
    recipe = model_recipe(meta, config, folder / CONFIG_FILE)
    try:
        state = load_file(folder / WEIGHTS_FILE, device=str(device))
    except (SafetensorError, OSError) as error:
        raise ModelFileError(
            f"{folder / WEIGHTS_FILE}: expected a safetensors weights file, found something else ({error})"
        ) from None
    try:
        check_model_config(recipe, str(folder / CONFIG_FILE))
    except RecipeError as error:
        raise ModelFileError(str(error)) from None
    with warnings.catch_warnings(), _random_init_notice_dropped():
        warnings.simplefilter("ignore")  # random init is overwritten by the saved weights below
        backbone = build_backbone(recipe, device=device, load_weights=False)
    model = build_model(backbone, rank_space, config).to(device)
    if "cached_prototypes" in state:  # its size is only known from the file
        model.cached_prototypes = state["cached_prototypes"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelFileError(
            f"{folder / WEIGHTS_FILE}: weights do not fit the {config.arch} model "
            f"described in {CONFIG_FILE}: {str(error)[:500]}"
        ) from None
    model.eval()
    return model, {
        **meta,
        "rank_space": rank_space,
        "config": config,
        "recipe": recipe,
        "preprocess": backbone.preprocess_eval,
    }
