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
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.factory import load_state_dict
from torch import nn

from l2rclip.models.kinds import DEMO_ARCH, DEMO_TAG, BackboneKind, backbone_kind, demo_weights_file, is_none

log = logging.getLogger(__name__)

TINY_ARCH = "L2RCLIP-Tiny"
_HF_HOST = "huggingface.co"
_PROBE_TIMEOUT_S = 3.0


class WeightsUnavailableError(RuntimeError):
    """CLIP weights were asked for by tag but cannot be found locally or downloaded."""


class WeightsFileError(ValueError):
    """`model.pretrained` names a local file that does not hold weights of the architecture."""


@dataclass
class Backbone:
    """An open_clip CLIP model with its preprocessing and tokenizer.

    Attributes:
        model: the open_clip CLIP (text tower and logit scale frozen).
        preprocess_train: training transform (augmenting).
        preprocess_eval: evaluation transform (resize + centre crop).
        tokenizer: the architecture's tokenizer.
        arch: architecture name; pretrained: the weights source as given.
        is_clip: True only for real CLIP weights (not the demo CLIP, not random).
        kind: `clip`, `demo` or `random` (see `backbone_kind`).
    """

    model: nn.Module
    preprocess_train: Any
    preprocess_eval: Any
    tokenizer: Any
    arch: str
    pretrained: str
    is_clip: bool
    kind: BackboneKind = "clip"


def register_builtin_configs() -> None:
    """Make the package's own architecture configs (the tiny test model, the demo CLIP) known to open_clip."""
    if not {TINY_ARCH, DEMO_ARCH} <= set(open_clip.list_models()):
        config_dir = resources.files("l2rclip.models") / "configs"
        open_clip.add_model_config(Path(str(config_dir)))


def load_backbone(arch: str, pretrained: str | None, device: str | torch.device = "cpu") -> Backbone:
    """Create the CLIP model and transforms for `arch` with weights from `pretrained`.

    Raises:
        ValueError: unknown architecture or a `pretrained` that is neither tag, file nor `none`.
        WeightsFileError: a local file that cannot be read as weights, or holds another
            architecture's (one line: the file, what was expected, what was found).
        WeightsUnavailableError: a tag whose weights are not cached and cannot be downloaded.
    """
    register_builtin_configs()
    if arch not in open_clip.list_models():
        raise ValueError(f"model.arch: unknown open_clip architecture {arch!r}; "
                         f"expected one of open_clip.list_models() (e.g. ViT-B-16, ViT-B-32, {TINY_ARCH})")
    source = _resolve_weights(arch, pretrained)
    quick_gelu = bool(source.get("quick_gelu", False))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*QuickGELU mismatch.*")
        try:
            model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
                arch, pretrained=source.get("path"), force_quick_gelu=quick_gelu, device=device)
        except Exception as error:  # noqa: BLE001 - torch, safetensors and open_clip raise many types
            if not source.get("file"):
                raise
            raise WeightsFileError(_weights_file_problem(arch, source["path"], error)) from None
    if source["path"] is None:
        warnings.warn(f"model.pretrained is 'none': {arch} is randomly initialised. This is NOT CLIP; "
                      "results measure the pipeline, not the method.", UserWarning, stacklevel=2)
    freeze_text_tower(model)
    kind = backbone_kind(arch, pretrained)
    return Backbone(model=model, preprocess_train=preprocess_train, preprocess_eval=preprocess_eval,
                    tokenizer=open_clip.get_tokenizer(arch), arch=arch, pretrained=str(pretrained),
                    is_clip=kind == "clip", kind=kind)


def weights_unavailable_reason(arch: str, pretrained: str | None) -> str | None:
    """Why the weights of `arch`/`pretrained` cannot be had here, or None when they can (cheap: no load)."""
    register_builtin_configs()
    try:
        _resolve_weights(arch, pretrained)
    except WeightsUnavailableError as error:
        return str(error)
    return None


def text_tower_modules(model: nn.Module) -> list[nn.Module | nn.Parameter]:
    """The pieces of an open_clip CLIP that make up the text side (and the logit scale)."""
    names = ["token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection",
             "logit_scale", "logit_bias"]
    return [getattr(model, name) for name in names if getattr(model, name, None) is not None]


def freeze_text_tower(model: nn.Module) -> None:
    """Freeze token embedding, text transformer, projection and logit scale (no gradients, ever)."""
    if not hasattr(model, "transformer") or not hasattr(model, "token_embedding"):
        raise ValueError(f"{type(model).__name__} has no built-in CLIP text tower; L2RCLIP needs an "
                         "open_clip architecture with a standard text transformer (not a HF text model)")
    for part in text_tower_modules(model):
        params = [part] if isinstance(part, nn.Parameter) else part.parameters()
        for param in params:
            param.requires_grad_(False)


def _resolve_weights(arch: str, pretrained: str | None) -> dict[str, Any]:
    """Turn `pretrained` into {'path': tag-or-file-or-None, 'quick_gelu': bool}, failing fast offline."""
    if is_none(pretrained):
        return {"path": None}
    if pretrained == DEMO_TAG:
        path = demo_weights_file(arch)
        if path.is_file():
            return {"path": str(path), "file": True}
        if arch != DEMO_ARCH:
            raise ValueError(f"model.pretrained: 'demo' weights ship for model.arch {DEMO_ARCH} only; found "
                             f"model.arch {arch!r} (no file {path})")
        raise WeightsUnavailableError(f"model.pretrained: 'demo': expected the demo CLIP weights at {path}, "
                                      "found no file; rebuild them with `dvc repro pretrain`")
    if os.path.isfile(pretrained):
        return {"path": str(pretrained), "file": True}
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ValueError(f"model.pretrained: {pretrained!r} is neither a weights file nor a tag of {arch}; "
                         f"expected a file path, 'none', or one of the tags {tags}")
    if not _tag_is_cached(tag_cfg):
        host = _HF_HOST if tag_cfg.get("hf_hub") else urlparse(tag_cfg.get("url", "")).hostname
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        if offline or not _reachable(host):
            raise WeightsUnavailableError(_offline_message(arch, pretrained, tag_cfg, offline))
    return {"path": pretrained, "quick_gelu": tag_cfg.get("quick_gelu", False)}


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
    for what, names in (("missing", sorted(set(wanted) - set(shapes))),
                        ("unexpected", sorted(set(shapes) - set(wanted)))):
        if names:
            more = ", ..." if len(names) > 3 else ""
            problems.append(f"{len(names)} {what} keys ({', '.join(names[:3])}{more})")
    mismatched = [name for name in wanted if name in shapes and shapes[name] != wanted[name]]
    if mismatched:
        name = mismatched[0]
        problems.append(f"{len(mismatched)} shape mismatches (e.g. {name}: file {shapes[name]} vs model "
                        f"{wanted[name]})")
    return f"{expected}; found {'; '.join(problems) if problems else _first_line(error)}"


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _tag_is_cached(tag_cfg: dict[str, Any]) -> bool:
    """Whether open_clip would find the tag's weights without the network."""
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
    return (f"CLIP weights for {arch} with pretrained={tag!r} are not cached here and {why} "
            f"(source: {where}). Supply the weights in one of these ways:\n"
            f"  1. on a connected machine run: python -c \"import open_clip; "
            f"open_clip.create_model('{arch}', pretrained='{tag}')\" and copy its Hugging Face cache "
            f"(~/.cache/huggingface) to this machine;\n"
            f"  2. set model.pretrained in params.yaml to a local weights file "
            f"(open_clip .bin/.pt/.safetensors);\n"
            f"  3. set model.pretrained: none for a random-init pipeline check (NOT CLIP results).")
