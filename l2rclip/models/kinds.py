"""Which weights a number came from: real CLIP, the demo CLIP, or random; and the caveat to print.

One place decides it, so that every output (stage logs, reports, figures, MLflow tags) labels
its numbers alike. The module is light (no torch, no open_clip): report stages import it.

- `clip`: an open_clip tag or a weights file that is not the demo CLIP: no caveat;
- `demo`: the demo CLIP shipped with the package (`model.pretrained: demo`), or any file the
  pretrain stage wrote (safetensors metadata `l2rclip` holding `"kind": "demo"`): a tiny CLIP pretrained on
  drawn shapes only. Its language prior is real but narrow; its numbers are not CLIP results;
- `random`: `model.pretrained: none`: a pipeline check.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from safetensors import SafetensorError, safe_open

DEMO_ARCH = "L2RCLIP-Demo"
DEMO_TAG = "demo"  # model.pretrained value selecting the shipped demo CLIP weights
DEMO_KIND = "demo"  # `kind` in the safetensors metadata of the weights the pretrain stage writes
METADATA_KEY = "l2rclip"  # safetensors metadata key of that JSON (kind, arch, recipe)
BackboneKind = Literal["clip", "demo", "random"]
BACKBONE_LABELS: dict[str, str] = {
    "clip": "",
    "demo": "DEMO CLIP (pretrained on drawn shapes only, NOT real CLIP results)",
    "random": "PIPELINE CHECK (random-initialised backbone, NOT CLIP results)",
}
WEIGHTS_NOTES: dict[str, str] = {  # the short form, for a table cell beside a backbone's name
    "clip": "CLIP",
    "demo": "DEMO CLIP, NOT real CLIP",
    "random": "random init, NOT CLIP",
}
_ORDER = ("clip", "demo", "random")  # from most to least CLIP-like


def is_none(pretrained: str | None) -> bool:
    """Whether `pretrained` asks for random weights (`none`, `null`, empty)."""
    return pretrained is None or str(pretrained).lower() in ("", "none", "null")


def demo_weights_file(arch: str = DEMO_ARCH) -> Path:
    """Where the package keeps the demo CLIP weights of `arch` (the file may be absent)."""
    return Path(str(resources.files("l2rclip.models") / "weights" / f"{arch}.fp16.safetensors"))


def backbone_kind(arch: str, pretrained: str | None) -> BackboneKind:
    """Which weights `arch` / `pretrained` give: real CLIP, the demo CLIP, or random.

    `none` is random; `demo`, or a safetensors file whose metadata `l2rclip` says `"kind": "demo"`
    (wherever it was copied), is the demo CLIP; every other tag or file is taken as real CLIP.
    Cheap: reads at most a safetensors header. `arch` does not change the answer; it keeps the
    call sites explicit about what they label.
    """
    del arch
    if is_none(pretrained):
        return "random"
    if str(pretrained) == DEMO_TAG:
        return "demo"
    if str(pretrained).endswith(".safetensors") and os.path.isfile(str(pretrained)):
        try:
            with safe_open(str(pretrained), framework="pt") as weights:
                recorded = json.loads((weights.metadata() or {}).get(METADATA_KEY, "{}"))
        except (OSError, SafetensorError, json.JSONDecodeError):
            return "clip"  # not readable as safetensors or not our metadata: loading it will say why
        if isinstance(recorded, dict) and recorded.get("kind") == DEMO_KIND:
            return "demo"
    return "clip"


def kind_of(meta: Mapping[str, Any]) -> BackboneKind:
    """The backbone kind recorded in a run's or model's metadata.

    `backbone_kind` when present; else derived from `backbone` and `pretrained`; in metadata older
    than the demo CLIP, from `is_clip` (False meant random then).
    """
    if meta.get("backbone_kind") in BACKBONE_LABELS:
        return meta["backbone_kind"]
    if meta.get("pretrained") is not None and meta.get("backbone") is not None:
        return backbone_kind(str(meta["backbone"]), str(meta["pretrained"]))
    return "clip" if meta.get("is_clip") else "random"


def weights_note(meta: Mapping[str, Any]) -> str:
    """A table cell's word on the weights behind a row (run or model metadata, as `kind_of` reads it)."""
    return WEIGHTS_NOTES[kind_of(meta)]


def least_clip(kinds: Iterable[BackboneKind]) -> BackboneKind:
    """The kind to label a summary of several runs with: the least CLIP-like among them."""
    return max(kinds, key=_ORDER.index, default="random")


def backbone_label(kind: BackboneKind | Mapping[str, Any]) -> str:
    """The caveat printed beside a number: '' for real CLIP, else what the backbone was.

    Args:
        kind: a kind, or metadata as `kind_of` reads it.

    Raises:
        ValueError: an unknown kind.
    """
    if isinstance(kind, Mapping):
        kind = kind_of(kind)
    if kind not in BACKBONE_LABELS:
        raise ValueError(f"backbone kind: expected one of {list(BACKBONE_LABELS)}, found {kind!r}")
    return BACKBONE_LABELS[kind]
