"""Loading a CLIP backbone through open_clip, with an honest offline story.

`pretrained` is one of:
- an open_clip tag (`openai`, `laion2b_s34b_b88k`, ...): weights come from the local cache, or are
  downloaded on a connected machine. Offline and not cached, loading fails within seconds with a
  message that says how to supply the weights, instead of hanging in retries;
- a path to a local weights file (`.bin`, `.pt`, `.safetensors`);
- `demo`: the demo CLIP shipped with the package (`L2RCLIP-Demo` only): a tiny CLIP pretrained
  here on drawn shapes with captions (`python -m l2rclip.stages.pretrain`). It has a real but narrow
  language prior (number words, shapes, colours), so the method can be seen offline; its numbers
  are *not* CLIP results and are labelled so (l2rclip.models.kinds);
- `none`: random initialisation. Useful for pipeline checks and tests, and loudly *not CLIP*.

What network and preprocessing that gives is the backbone's recipe (`l2rclip.models.recipe`):
`load_backbone` resolves it and builds it with the weights; a saved model stores it, and
`build_backbone(recipe, load_weights=False)` rebuilds exactly it for the saved weights.
Every number must say which of the three it came from: `l2rclip.models.kinds.backbone_kind` tells
real CLIP, the demo CLIP and random weights apart, `backbone_label` is the caveat printed with it.

The text tower and the logit scale are always frozen (L2RCLIP tunes prompts, not the text encoder).
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.factory import load_state_dict
from torch import nn

from l2rclip.models.kinds import BackboneKind
from l2rclip.models.recipe import TINY_ARCH, BackboneRecipe, register_builtin_configs, resolve_recipe, tag_config

if TYPE_CHECKING:
    # open_clip ships no type hints, so to mypy this is `Any`: a CLIP's towers are reached by
    # attribute (`visual`, `token_embedding`, `transformer`, ...), which typed as an `nn.Module`
    # would all read as `Tensor | Module`.
    from open_clip import CLIP

__all__ = [
    "TINY_ARCH",
    "Backbone",
    "WeightsFileError",
    "WeightsUnavailableError",
    "build_backbone",
    "create_clip",
    "freeze_text_tower",
    "load_backbone",
    "register_builtin_configs",
    "weights_unavailable_reason",
]

log = logging.getLogger(__name__)

_HF_HOST = "huggingface.co"
_PROBE_TIMEOUT_S = 3.0


class WeightsUnavailableError(RuntimeError):
    """CLIP weights were asked for by tag but cannot be found locally or downloaded."""


class WeightsFileError(ValueError):
    """`model.pretrained` names a local file that does not hold weights of the architecture."""


@dataclass
class Backbone:
    """An open_clip CLIP model with its preprocessing, tokenizer and recipe.

    Attributes:
        model: the open_clip CLIP (text tower and logit scale frozen).
        preprocess_train: training transform (augmenting).
        preprocess_eval: evaluation transform (resize + centre crop).
        tokenizer: the architecture's tokenizer.
        recipe: what network and preprocessing this is (`l2rclip.models.recipe`).
    """

    model: CLIP
    preprocess_train: Any
    preprocess_eval: Any
    tokenizer: Any
    recipe: BackboneRecipe

    @property
    def arch(self) -> str:
        """The open_clip architecture name."""
        return self.recipe.arch

    @property
    def is_clip(self) -> bool:
        """False when the weights are random (`pretrained: none`)."""
        return self.recipe.is_clip

    @property
    def kind(self) -> BackboneKind:
        """`clip`, `demo` or `random` (`l2rclip.models.kinds`)."""
        return self.recipe.kind


def load_backbone(arch: str, pretrained: str | None, device: str | torch.device = "cpu") -> Backbone:
    """Create the CLIP model and transforms for `arch` with weights from `pretrained`.

    Raises:
        ValueError (RecipeError): unknown architecture or a `pretrained` that is neither tag, file nor `none`.
        WeightsFileError: a local file that cannot be read as weights, or holds another
            architecture's (one line: the file, what was expected, what was found).
        WeightsUnavailableError: a tag whose weights are not cached and cannot be downloaded.
    """
    recipe = resolve_recipe(arch, pretrained)
    if reason := weights_unavailable_reason(recipe):
        raise WeightsUnavailableError(reason)
    backbone = build_backbone(recipe, device, load_weights=True)
    if recipe.source == "none":
        warnings.warn(
            f"model.pretrained is 'none': {arch} is randomly initialised. This is NOT CLIP; "
            "results measure the pipeline, not the method.",
            UserWarning,
            stacklevel=2,
        )
    return backbone


def build_backbone(
    recipe: BackboneRecipe, device: str | torch.device = "cpu", load_weights: bool = True
) -> Backbone:
    """The backbone of `recipe`: its network, transforms and tokenizer, text tower frozen.

    `load_weights` False builds the network with random weights, for a saved model whose own
    weights replace them: nothing is read or downloaded, whatever the recipe's source.
    """
    model = create_clip(recipe, device, load_weights)
    freeze_text_tower(model)
    return Backbone(
        model=model,
        preprocess_train=recipe.preprocess.transform(is_train=True),
        preprocess_eval=recipe.preprocess.transform(is_train=False),
        tokenizer=open_clip.get_tokenizer(recipe.arch),
        recipe=recipe,
    )


def create_clip(recipe: BackboneRecipe, device: str | torch.device = "cpu", load_weights: bool = True) -> CLIP:
    """`open_clip.create_model` with the recipe's activation and preprocessing (and weights, if asked)."""
    pretrained = recipe.weights_argument() if load_weights else None
    try:
        return open_clip.create_model(
            recipe.arch,
            pretrained=pretrained,
            force_quick_gelu=recipe.quick_gelu,
            force_preprocess_cfg=recipe.preprocess.open_clip_cfg(),
            device=device,
        )
    except Exception as error:  # noqa: BLE001 - torch, safetensors and open_clip raise many types
        if pretrained is None or recipe.source != "file":
            raise
        raise WeightsFileError(_weights_file_problem(recipe.arch, pretrained, error)) from None


def weights_unavailable_reason(recipe_or_arch: BackboneRecipe | str, pretrained: str | None = None) -> str | None:
    """Why the recipe's weights cannot be had here, or None when they can (cheap: no load, no download).

    Accepts a recipe, or `(arch, pretrained)` to resolve one (without hashing a weights file).
    """
    recipe = (
        recipe_or_arch
        if isinstance(recipe_or_arch, BackboneRecipe)
        else resolve_recipe(recipe_or_arch, pretrained, hash_file=False)
    )
    if recipe.source != "tag" or recipe.pretrained is None:  # a tag recipe always names its tag
        return None
    tag_cfg = tag_config(recipe.arch, recipe.pretrained)
    if _tag_is_cached(tag_cfg):
        return None
    if tag_cfg.get("file"):
        return (
            f"model.pretrained: the tag {recipe.pretrained!r} of {recipe.arch} names the local weights file "
            f"{tag_cfg['file']}, which does not exist"
        )
    host = _HF_HOST if tag_cfg.get("hf_hub") else urlparse(tag_cfg.get("url", "")).hostname
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or not _reachable(host):
        return _offline_message(recipe.arch, recipe.pretrained, tag_cfg, offline)
    return None


def text_tower_modules(model: nn.Module) -> list[nn.Module | nn.Parameter]:
    """The pieces of an open_clip CLIP that make up the text side (and the logit scale)."""
    names = [
        "token_embedding",
        "positional_embedding",
        "transformer",
        "ln_final",
        "text_projection",
        "logit_scale",
        "logit_bias",
    ]
    return [getattr(model, name) for name in names if getattr(model, name, None) is not None]


def freeze_text_tower(model: nn.Module) -> None:
    """Freeze token embedding, text transformer, projection and logit scale (no gradients, ever)."""
    if not hasattr(model, "transformer") or not hasattr(model, "token_embedding"):
        raise ValueError(
            f"{type(model).__name__} has no built-in CLIP text tower; L2RCLIP needs an "
            "open_clip architecture with a standard text transformer (not a HF text model)"
        )
    for part in text_tower_modules(model):
        params = [part] if isinstance(part, nn.Parameter) else part.parameters()
        for param in params:
            param.requires_grad_(False)


def _weights_file_problem(arch: str, path: str, error: Exception) -> str:
    """One line on why open_clip could not load `path` into `arch`: unreadable, or which keys differ.

    Only called after loading failed, so the second read of the file and the random model built
    to compare against cost nothing on the normal path.
    """
    expected = f"model.pretrained: {path}: expected open_clip {arch} weights (.safetensors, or a torch state dict)"
    try:
        found = load_state_dict(path)
        shapes = {name: tuple(value.shape) for name, value in found.items()}
    except Exception as read_error:  # noqa: BLE001 - whatever the file is, it is not weights
        return f"{expected}; the file cannot be read as weights: {_first_line(read_error)}"
    wanted = {name: tuple(value.shape) for name, value in open_clip.create_model(arch).state_dict().items()}
    problems = []
    for what, names in (
        ("missing", sorted(set(wanted) - set(shapes))),
        ("unexpected", sorted(set(shapes) - set(wanted))),
    ):
        if names:
            more = ", ..." if len(names) > 3 else ""
            problems.append(f"{len(names)} {what} keys ({', '.join(names[:3])}{more})")
    mismatched = [name for name in wanted if name in shapes and shapes[name] != wanted[name]]
    if mismatched:
        name = mismatched[0]
        problems.append(
            f"{len(mismatched)} shape mismatches (e.g. {name}: file {shapes[name]} vs model {wanted[name]})"
        )
    return f"{expected}; found {'; '.join(problems) if problems else _first_line(error)}"


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _tag_is_cached(tag_cfg: dict[str, Any]) -> bool:
    """Whether open_clip would find the tag's weights without the network."""
    if tag_cfg.get("file"):
        return os.path.isfile(tag_cfg["file"])
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        # Same convention as open_clip: "org/model/" means the default file names.
        repo, filename = os.path.split(tag_cfg["hf_hub"])
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)
    url = tag_cfg.get("url", "")
    cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(urlparse(url).path)
    return bool(url) and cached.is_file()


def _reachable(host: str | None) -> bool:
    """A quick TCP probe, so that an offline machine fails in seconds rather than after retries."""
    if not host:
        return False
    try:
        with socket.create_connection((host, 443), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _offline_message(arch: str, tag: str, tag_cfg: dict[str, Any], offline_env: bool) -> str:
    where = tag_cfg.get("hf_hub") or tag_cfg.get("url")
    why = "HF_HUB_OFFLINE is set" if offline_env else "the download host cannot be reached"
    return (
        f"CLIP weights for {arch} with pretrained={tag!r} are not cached here and {why} "
        f"(source: {where}). Supply the weights in one of these ways:\n"
        f'  1. on a connected machine run: python -c "import open_clip; '
        f"open_clip.create_model('{arch}', pretrained='{tag}')\" and copy its Hugging Face cache "
        f"(~/.cache/huggingface) to this machine;\n"
        f"  2. set model.pretrained in params.yaml to a local weights file "
        f"(open_clip .bin/.pt/.safetensors);\n"
        f"  3. set model.pretrained: none for a random-init pipeline check (NOT CLIP results)."
    )
