"""The backbone recipe: everything that decides which network a CLIP backbone is, resolved once.

open_clip builds a backbone from an architecture name and a weights source, and *the source*
changes the network: an `openai` tag was trained with QuickGELU (`quick_gelu` in open_clip's
pretrained config, applied only when asked for), and a tag brings its own image preprocessing
(mean, std, interpolation, resize mode). A model rebuilt from the architecture name alone is
another network with another input pipeline. So a backbone is described by a `BackboneRecipe`,
resolved from (arch, pretrained) through open_clip's model and pretrained configs, without
weights and without the network, and stored with every saved model; training, evaluation,
calibration, prediction, serving, the image store and the feature cache all use it, and loading
a saved model rebuilds exactly it (its weights come from the model file).

A recipe's weights `source` is one of:
- `tag`: an open_clip pretrained tag. Its config names where open_clip finds the weights (a
  Hugging Face repo, a URL, or, for a tag registered with a `file` entry such as a weights file
  shipped with a package, a local file, whose sha256 is then recorded too);
- `file`: a local weights file, recorded with its sha256 (`demo`, the demo CLIP shipped with the
  package, is such a file: `pretrained` keeps the name `demo`, `origin` the file);
- `none`: random initialisation (a pipeline check, not CLIP).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import open_clip
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from open_clip.utils import to_2tuple

from l2rclip.models.kinds import DEMO_ARCH, DEMO_TAG, BackboneKind, backbone_kind, demo_weights_file, is_none

if TYPE_CHECKING:
    import torch
    from PIL import Image

RECIPE_VERSION = 1
TINY_ARCH = "L2RCLIP-Tiny"
Source = Literal["tag", "file", "none"]
_SOURCES = ("tag", "file", "none")


class RecipeError(ValueError):
    """A recipe that cannot be resolved, read or rebuilt (the message says which key and why)."""


@dataclass(frozen=True)
class Preprocess:
    """open_clip's image preprocessing of a backbone (`PreprocessCfg` as open_clip resolves it).

    `size` is (height, width) of the model input; the others are `PreprocessCfg`'s fields.
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    resize_mode: str
    fill_color: int = 0

    def open_clip_cfg(self) -> dict[str, Any]:
        """As open_clip's preprocess dict (`force_preprocess_cfg` of `create_model`)."""
        return {**asdict(self), "size": tuple(self.size), "mode": "RGB"}

    def transform(self, is_train: bool) -> Callable[[Image.Image], torch.Tensor]:
        """open_clip's transform for this preprocessing: training (augmenting) or evaluation."""
        return image_transform_v2(PreprocessCfg(**self.open_clip_cfg()), is_train=is_train)


@dataclass(frozen=True)
class BackboneRecipe:
    """Which CLIP network a backbone is, and how its images are prepared.

    Attributes:
        arch: open_clip architecture name.
        source: `tag`, `file` or `none` (see the module docstring).
        pretrained: the tag or the file path as configured; None for `none`.
        sha256: hex digest of the weights file (a `file` source, or a tag backed by a local file).
        origin: where the weights come from, for the record (Hugging Face repo, URL, or file).
        quick_gelu: the activation: QuickGELU (what OpenAI-trained weights need) or GELU.
        preprocess: the image preprocessing open_clip resolves for this arch and source.
        model_cfg: open_clip's config of `arch` (towers, widths, ...) when the recipe was resolved.
        open_clip_version: the open_clip that resolved it (for the record).
    """

    arch: str
    source: Source
    pretrained: str | None
    sha256: str | None
    origin: str | None
    quick_gelu: bool
    preprocess: Preprocess
    model_cfg: dict[str, Any]
    open_clip_version: str

    @property
    def kind(self) -> BackboneKind:
        """Which weights these are: real CLIP, the demo CLIP or random (`l2rclip.models.kinds`)."""
        return "demo" if self.pretrained == DEMO_TAG else backbone_kind(self.arch, self.origin or self.pretrained)

    @property
    def is_clip(self) -> bool:
        """Whether the weights are real CLIP weights (not the demo CLIP, not random)."""
        return self.kind == "clip"

    def weights_argument(self) -> str | None:
        """The `pretrained` argument of `open_clip.create_model` that loads these weights."""
        if self.source == "none":
            return None
        return self.origin if self.source == "file" else self.pretrained

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in model.json as `recipe`)."""
        return {"version": RECIPE_VERSION, **asdict(self)}

    def key(self) -> str:
        """A stable text of the whole recipe, for cache keys."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> BackboneRecipe:
        """Read a stored recipe; errors name `where` (file and key), what was expected and found."""
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a backbone recipe object, found {type(data).__name__}")
        if data.get("version", RECIPE_VERSION) > RECIPE_VERSION:
            raise RecipeError(
                f"{where}.version: recipe version {data['version']} is newer than this l2rclip "
                f"understands ({RECIPE_VERSION}); upgrade l2rclip"
            )
        wanted = {f.name for f in fields(cls)}
        missing = sorted(wanted - set(data))
        if missing:
            raise RecipeError(f"{where}: expected the keys {sorted(wanted)}; missing {missing}")
        if data["source"] not in _SOURCES:
            raise RecipeError(f"{where}.source: expected one of {list(_SOURCES)}, found {data['source']!r}")
        if not isinstance(data["quick_gelu"], bool):
            raise RecipeError(f"{where}.quick_gelu: expected true or false, found {data['quick_gelu']!r}")
        if not isinstance(data["model_cfg"], dict):
            raise RecipeError(
                f"{where}.model_cfg: expected an open_clip model config object, "
                f"found {type(data['model_cfg']).__name__}"
            )
        pre = data["preprocess"]
        pre_fields = {f.name for f in fields(Preprocess)}
        if not isinstance(pre, dict) or not {"size", "mean", "std", "interpolation", "resize_mode"} <= set(pre):
            raise RecipeError(f"{where}.preprocess: expected an object with {sorted(pre_fields)}, found {pre!r}")
        try:
            preprocess = Preprocess(
                size=(int(pre["size"][0]), int(pre["size"][1])),
                mean=tuple(float(v) for v in pre["mean"]),
                std=tuple(float(v) for v in pre["std"]),
                interpolation=str(pre["interpolation"]),
                resize_mode=str(pre["resize_mode"]),
                fill_color=int(pre.get("fill_color", 0)),
            )
        except (TypeError, ValueError, IndexError) as error:
            raise RecipeError(
                f"{where}.preprocess: expected size [h, w], mean/std lists of numbers; found {pre!r} ({error})"
            ) from None
        return cls(**{**{k: data[k] for k in wanted}, "preprocess": preprocess})


def register_builtin_configs() -> None:
    """Make the package's own architecture configs (the tiny test model, the demo CLIP) known to open_clip."""
    if not {TINY_ARCH, DEMO_ARCH} <= set(open_clip.list_models()):
        config_dir = resources.files("l2rclip.models") / "configs"
        open_clip.add_model_config(Path(str(config_dir)))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tag_config(arch: str, tag: str) -> dict[str, Any]:
    """open_clip's pretrained config of `arch`/`tag` ({} when there is none)."""
    return open_clip.get_pretrained_cfg(arch, tag) or {}


def resolve_recipe(arch: str, pretrained: str | None, hash_file: bool = True) -> BackboneRecipe:
    """The recipe open_clip follows for `arch` with weights `pretrained`, from configs alone.

    Mirrors `open_clip.create_model`: the preprocessing starts from `PreprocessCfg`'s defaults,
    takes a tag's mean, std, interpolation and resize mode, and the input size of the
    architecture's vision tower; the activation is QuickGELU when the architecture's config or the
    tag's says so (open_clip itself only warns on a tag's `quick_gelu`; we build what the weights
    were trained with). No weights are read (except a local file's bytes, hashed unless
    `hash_file` is False) and nothing is downloaded.

    Raises:
        RecipeError: unknown architecture, or a `pretrained` that is neither tag, file nor `none`.
    """
    register_builtin_configs()
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise RecipeError(
            f"model.arch: unknown open_clip architecture {arch!r}; "
            f"expected one of open_clip.list_models() (e.g. ViT-B-16, ViT-B-32, {TINY_ARCH})"
        )
    tag_cfg: dict[str, Any] = {}
    source: Source
    sha256 = origin = None
    if is_none(pretrained):
        source, pretrained = "none", None
    elif pretrained == DEMO_TAG:
        path = demo_weights_file(arch)
        if arch != DEMO_ARCH:
            raise RecipeError(
                f"model.pretrained: 'demo' weights ship for model.arch {DEMO_ARCH} only; found model.arch {arch!r}"
            )
        if not path.is_file():
            raise RecipeError(
                f"model.pretrained: 'demo': expected the demo CLIP weights at {path}, found no "
                "file; rebuild them with `dvc repro pretrain`"
            )
        source, origin = "file", str(path)
        sha256 = file_sha256(path) if hash_file else None
    elif tag_cfg := tag_config(arch, str(pretrained)):
        source = "tag"
        local = tag_cfg.get("file")
        origin = local or tag_cfg.get("hf_hub") or tag_cfg.get("url") or None
        if local and hash_file and os.path.isfile(local):
            sha256 = file_sha256(local)
    elif os.path.isfile(str(pretrained)):
        source, origin = "file", str(pretrained)
        sha256 = file_sha256(str(pretrained)) if hash_file else None
    else:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise RecipeError(
            f"model.pretrained: {pretrained!r} is neither a weights file nor a tag of {arch}; "
            f"expected a file path, 'none', or one of the tags {tags}"
        )
    merged = merge_preprocess_dict(PreprocessCfg(), tag_cfg)
    size = to_2tuple(model_cfg["vision_cfg"]["image_size"])  # what the vision tower reports
    preprocess = Preprocess(
        size=(int(size[0]), int(size[1])),
        mean=tuple(float(v) for v in merged["mean"]),
        std=tuple(float(v) for v in merged["std"]),
        interpolation=merged["interpolation"],
        resize_mode=merged["resize_mode"],
        fill_color=int(merged["fill_color"]),
    )
    quick_gelu = bool(model_cfg.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False))
    return BackboneRecipe(
        arch=arch,
        source=source,
        pretrained=None if pretrained is None else str(pretrained),
        sha256=sha256,
        origin=origin,
        quick_gelu=quick_gelu,
        preprocess=preprocess,
        model_cfg=json.loads(json.dumps(model_cfg)),
        open_clip_version=open_clip.__version__,
    )


def check_model_config(recipe: BackboneRecipe, where: str) -> None:
    """Make sure open_clip builds `recipe.arch` as the recipe recorded it.

    An architecture open_clip does not know (a config registered by the code that trained the
    model) is registered from the recipe; one it defines differently (another open_clip version
    changed it) is an error, since the saved weights would go into another network.

    Raises:
        RecipeError: the installed open_clip defines `recipe.arch` differently (the keys named).
    """
    register_builtin_configs()
    installed = open_clip.get_model_config(recipe.arch)
    if installed is None:
        _register_config(recipe.arch, recipe.model_cfg)
        return
    installed = json.loads(json.dumps(installed))
    if installed != recipe.model_cfg:
        stored = recipe.model_cfg
        keys = sorted(k for k in set(installed) | set(stored) if installed.get(k) != stored.get(k))
        raise RecipeError(
            f"{where}: the model was saved with open_clip {recipe.open_clip_version}'s "
            f"{recipe.arch} config, which the installed open_clip {open_clip.__version__} defines "
            f"differently (keys {keys}); install open_clip_torch=={recipe.open_clip_version} "
            "and the l2rclip that saved it (its architecture configs)"
        )


def _register_config(arch: str, model_cfg: dict[str, Any]) -> None:
    """Register a stored architecture config with open_clip, through its public file-based API."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="l2rclip-arch-") as folder:
        path = Path(folder) / f"{arch}.json"
        path.write_text(json.dumps(model_cfg), encoding="utf-8")
        open_clip.add_model_config(path)


def recipe_of(model: Any) -> BackboneRecipe:
    """The recipe a model was built from (`l2rclip.models.factory.build_model` attaches it)."""
    recipe = getattr(model, "recipe", None)
    if not isinstance(recipe, BackboneRecipe):
        raise RecipeError(
            f"{type(model).__name__} carries no backbone recipe; build it with "
            "l2rclip.models.factory.build_model (or build_l2rclip) from a loaded backbone"
        )
    return recipe
