"""The backbone recipe: what open_clip resolves for (arch, tag), stored with a model and rebuilt exactly.

open_clip's `create_model_and_transforms(arch, pretrained=tag)` takes the tag's preprocessing but
only *warns* about its `quick_gelu` ("QuickGELU mismatch") and builds GELU unless told
`force_quick_gelu=True`; the reference here is the call without that mismatch, i.e. the network the
tag's weights were trained as. Everything is compared on resolved configs: no weights are read.
"""

import dataclasses
import json
import warnings

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from open_clip.utils import to_2tuple
from PIL import Image
from support.models import tiny_l2rclip

from l2rclip.config import ModelConfig, PromptConfig
from l2rclip.data.demo import generate_demo
from l2rclip.models.backbone import TINY_ARCH, create_clip
from l2rclip.models.checkpoint import (
    CONFIG_FILE,
    LegacyModelWarning,
    ModelFileError,
    load_model,
    save_model,
    upgrade_model,
)
from l2rclip.models.factory import planned_recipe
from l2rclip.models.recipe import BackboneRecipe, RecipeError, resolve_recipe
from l2rclip.ranks import RankSpace
from l2rclip.runtime import describe_device, device_report
from l2rclip.training.features import cached_image_features


def standard_text_tower(arch: str) -> bool:
    """Architectures L2RCLIP can use: open_clip's CLIP class with its own text transformer."""
    cfg = open_clip.get_model_config(arch)
    return bool(cfg) and not (
        cfg.get("custom_text") or "hf_model_name" in cfg["text_cfg"] or "multimodal_cfg" in cfg
    )


STANDARD_TAGS = [(arch, tag) for arch, tag in open_clip.list_pretrained() if standard_text_tower(arch)]


class Recorded(torch.nn.Module):
    """Stands in for open_clip's CLIP class: keeps the constructor config open_clip resolved, builds nothing."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self.visual = torch.nn.Module()
        self.visual.image_size = to_2tuple(kwargs["vision_cfg"]["image_size"])  # as ViT and timm towers report it


@pytest.fixture
def recorded_open_clip(monkeypatch):
    """open_clip's real resolution code, with model construction recorded and downloads refused."""
    monkeypatch.setattr(open_clip.factory, "CLIP", Recorded)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **_: "weights-are-never-read-here")


def reference(arch: str, tag: str, device: str = "cpu"):
    """What open_clip builds for the tag (without a QuickGELU mismatch), weights not loaded."""
    tag_quick_gelu = open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _, preprocess_eval = open_clip.create_model_and_transforms(
            arch, pretrained=tag, load_weights=False, force_quick_gelu=tag_quick_gelu, device=device
        )
    assert not [w for w in caught if "QuickGELU mismatch" in str(w.message)], f"{arch}/{tag}: reference mismatch"
    return model, preprocess_eval


def stored_and_rebuilt(arch: str, tag: str) -> BackboneRecipe:
    """The recipe as a saved model stores it (JSON) and as loading reads it back."""
    recipe = resolve_recipe(arch, tag, hash_file=False)
    stored = json.loads(json.dumps(recipe.to_dict()))
    rebuilt = BackboneRecipe.from_dict(stored, "model.json: recipe")
    assert rebuilt == recipe
    return rebuilt


SAMPLE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (211, 343, 3), dtype=np.uint8))


@pytest.mark.parametrize(("arch", "tag"), STANDARD_TAGS, ids=[f"{a}:{t}" for a, t in STANDARD_TAGS])
def test_every_tag_rebuilds_the_network_and_transform_open_clip_resolves(arch, tag, recorded_open_clip):
    ref_model, ref_eval = reference(arch, tag)
    recipe = stored_and_rebuilt(arch, tag)
    model = create_clip(recipe, load_weights=False)  # what loading a saved model builds
    assert model.kwargs == ref_model.kwargs  # the whole network config, the activation included
    assert recipe.quick_gelu == bool(ref_model.kwargs.get("quick_gelu", False))
    resolved = {k: (tuple(v) if isinstance(v, list) else v) for k, v in model.visual.preprocess_cfg.items()}
    assert resolved == ref_model.visual.preprocess_cfg
    ours = recipe.preprocess.transform(is_train=False)
    assert repr(ours) == repr(ref_eval)
    assert torch.equal(ours(SAMPLE), ref_eval(SAMPLE))


def test_the_tags_the_issue_names_resolve_as_their_weights_need():
    assert len(STANDARD_TAGS) > 100
    assert resolve_recipe("ViT-B-16", "openai").quick_gelu  # the paper's backbone: QuickGELU
    assert not resolve_recipe("ViT-B-16", "none").quick_gelu
    laion = resolve_recipe("ViT-L-14", "laion2b_s32b_b82k").preprocess
    assert laion.mean == (0.5, 0.5, 0.5) and laion.std == (0.5, 0.5, 0.5)
    clipa = resolve_recipe("ViT-L-14-CLIPA", "datacomp1b").preprocess
    assert (clipa.interpolation, clipa.resize_mode) == ("bilinear", "squash")


def activations(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__name__ in ("GELU", "QuickGELU")}


REAL_TOWERS = [
    ("RN50", "openai"),
    ("ViT-B-16", "openai"),
    ("ViT-L-14", "laion2b_s32b_b82k"),
    ("convnext_base", "laion400m_s13b_b51k"),
]


@pytest.mark.parametrize(("arch", "tag"), REAL_TOWERS)
def test_real_networks_on_the_meta_device(arch, tag, monkeypatch):
    """Real towers (ResNet, ViT, timm) built without memory: same activation modules and input size."""
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **_: "never-read")
    with torch.device("meta"):
        ref_model, ref_eval = reference(arch, tag, device="meta")
        model = create_clip(stored_and_rebuilt(arch, tag), device="meta", load_weights=False)
    assert activations(model.transformer) == activations(ref_model.transformer)
    assert activations(model.transformer) == ({"QuickGELU"} if tag == "openai" else {"GELU"})
    assert to_2tuple(ref_model.visual.preprocess_cfg["size"]) == resolve_recipe(arch, tag).preprocess.size
    assert repr(resolve_recipe(arch, tag).preprocess.transform(False)) == repr(ref_eval)


def test_stored_recipe_errors_name_the_key():
    good = resolve_recipe(TINY_ARCH, "none").to_dict()
    with pytest.raises(RecipeError, match=r"recipe.quick_gelu: expected true or false, found 'yes'"):
        BackboneRecipe.from_dict({**good, "quick_gelu": "yes"}, "recipe")
    with pytest.raises(RecipeError, match=r"missing \['preprocess'\]"):
        BackboneRecipe.from_dict({k: v for k, v in good.items() if k != "preprocess"}, "recipe")
    with pytest.raises(RecipeError, match="recipe.source: expected one of"):
        BackboneRecipe.from_dict({**good, "source": "cloud"}, "recipe")
    with pytest.raises(RecipeError, match="neither a weights file nor a tag"):
        resolve_recipe(TINY_ARCH, "no-such-tag")


def test_a_weights_file_is_recorded_with_its_hash(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"0123")
    recipe = resolve_recipe(TINY_ARCH, str(path))
    assert recipe.source == "file" and recipe.pretrained == str(path)
    assert recipe.sha256 == "1be2e452b46d7a0d9656bbb1f768e8248eba1b75baed65f5d99eafa948899a6a"


def test_a_tag_may_name_a_local_file(tmp_path, monkeypatch):
    """A named local tag (a weights file shipped with a package) is a tag whose config holds `file`."""
    path = tmp_path / "demo.safetensors"
    path.write_bytes(b"weights")
    local = {"file": str(path), "hf_hub": "", "url": "", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_ARCH, {"local": local})
    recipe = resolve_recipe(TINY_ARCH, "local")
    assert (recipe.source, recipe.origin, recipe.preprocess.mean) == ("tag", str(path), (0.5, 0.5, 0.5))
    assert recipe.sha256 is not None and len(recipe.sha256) == 64


def test_the_planned_recipe_reads_only_the_params_the_preprocess_stage_declares():
    """dvc.yaml's preprocess params (model.arch, model.pretrained, model.fallback.{enabled,arch}) are
    all the recipe depends on: other model settings leave it, and so the image store, unchanged."""
    base = ModelConfig(arch=TINY_ARCH, pretrained="none")
    recipe = planned_recipe(base)
    undeclared = dataclasses.replace(
        base,
        method="coop",
        image_tower="frozen",
        prompt=PromptConfig(context_init="x"),
        fallback=dataclasses.replace(base.fallback, epochs=1, lr_image=1.0),
    )
    assert planned_recipe(undeclared) == recipe
    assert planned_recipe(dataclasses.replace(base, arch="ViT-B-32")) != recipe


def tiny_model(arch: str = TINY_ARCH, pretrained: str = "none", seed: int = 0):
    _, model, config = tiny_l2rclip(3, "the number of", arch, pretrained, seed)
    return model, config


def test_a_format_1_model_is_upgraded_with_one_warning(tiny_tags, tmp_path):
    arch, _ = tiny_tags
    model, config = tiny_model(arch, "sim_quickgelu")
    folder = save_model(model, tmp_path / "model", config, RankSpace(list(range(1, 4))))
    meta = json.loads((folder / CONFIG_FILE).read_text())
    assert meta["recipe"]["quick_gelu"] is True and meta["version"] == 2
    del meta["recipe"]
    (folder / CONFIG_FILE).write_text(json.dumps({**meta, "version": 1}))

    with pytest.warns(LegacyModelWarning) as caught:
        loaded, loaded_meta = load_model(folder)
    assert len([w for w in caught if issubclass(w.category, LegacyModelWarning)]) == 1
    assert "quick_gelu=True" in str(caught[0].message) and "upgrade_model" in str(caught[0].message)
    assert loaded_meta["recipe"] == model.recipe
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images)["logits"], model(images)["logits"])

    upgrade_model(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LegacyModelWarning)
        assert load_model(folder)[1]["recipe"] == model.recipe


def test_a_format_1_model_whose_tag_is_unknown_is_refused_with_the_conversion(tmp_path):
    model, config = tiny_model()
    folder = save_model(model, tmp_path / "model", config, RankSpace(list(range(1, 4))))
    meta = json.loads((folder / CONFIG_FILE).read_text())
    del meta["recipe"]
    meta["model"]["pretrained"] = "a_tag_this_open_clip_lacks"
    (folder / CONFIG_FILE).write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(ModelFileError, match="format version 1.*upgrade_model"):
        load_model(folder)


def test_another_open_clip_definition_of_the_architecture_is_refused(tmp_path):
    model, config = tiny_model()
    folder = save_model(model, tmp_path / "model", config, RankSpace(list(range(1, 4))))
    meta = json.loads((folder / CONFIG_FILE).read_text())
    meta["recipe"]["model_cfg"]["vision_cfg"]["layers"] = 12
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"defines differently \(keys \['vision_cfg'\]\)"):
        load_model(folder)


def test_the_feature_cache_key_holds_the_activation(tmp_path):
    """Same weights, another activation gives other frozen features: the cache must not be shared."""
    generate_demo(tmp_path / "demo", n_per_rank=1, image_size=64)
    paths = sorted(p.relative_to(tmp_path / "demo").as_posix() for p in (tmp_path / "demo").rglob("*.png"))[:4]
    table = pd.DataFrame({"path": paths, "rank": 0})
    model, _ = tiny_model()
    args = (
        table,
        tmp_path / "demo",
        model.recipe.preprocess.transform(False),
        tmp_path / "cache",
        torch.device("cpu"),
    )
    cached_image_features(model, *args)
    cached_image_features(model, *args)
    assert len(list((tmp_path / "cache").glob("features-*.safetensors"))) == 1  # reused
    model.recipe = dataclasses.replace(model.recipe, quick_gelu=not model.recipe.quick_gelu)
    cached_image_features(model, *args)
    assert len(list((tmp_path / "cache").glob("features-*.safetensors"))) == 2


def test_the_device_report_says_what_auto_resolved_to():
    report = device_report(torch.device("cpu"), amp=True)
    assert report["device"] == "cpu" and report["autocast"] == "off" and report["gpu"] == "none"
    assert report["torch"] == torch.__version__ and report["cuda"] == (torch.version.cuda or "none")
    assert describe_device(report).startswith("device cpu (no GPU), float32 weights, autocast off")
