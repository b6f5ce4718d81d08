"""Assembling an L2RCLIP model from a loaded backbone and the `model` section of params.yaml."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings

import torch

from l2rclip.config import ModelConfig
from l2rclip.methods import HEAD_KINDS
from l2rclip.models.backbone import Backbone, WeightsUnavailableError, load_backbone, weights_unavailable_reason
from l2rclip.models.heads import OrdinalHeadModel
from l2rclip.models.kinds import DEMO_TAG, backbone_kind, backbone_label, demo_weights_file
from l2rclip.models.l2rclip import L2RCLIP
from l2rclip.models.prompts import RankPromptLearner
from l2rclip.models.rankformer import RankFormer
from l2rclip.models.recipe import BackboneRecipe, resolve_recipe
from l2rclip.models.text_encoder import PromptTextEncoder
from l2rclip.ranks import RankSpace

log = logging.getLogger(__name__)


def build_l2rclip(backbone: Backbone, rank_space: RankSpace, config: ModelConfig) -> L2RCLIP:
    """Build the model: prompts initialised from the backbone's word embeddings, frozen text tower.

    The model carries the backbone's recipe (`model.recipe`), so that whatever saves it stores
    the network it is, and whatever caches its features keys them by it.
    """
    clip = backbone.model
    prompt_learner = RankPromptLearner(
        clip.token_embedding, backbone.tokenizer, rank_space.names, **dataclasses.asdict(config.prompt)
    )
    rankformer_options = dataclasses.asdict(config.rankformer)
    rankformer = (
        RankFormer(
            len(rank_space),
            clip.token_embedding.weight.shape[1],
            **{k: v for k, v in rankformer_options.items() if k != "enabled"},
        )
        if config.rankformer.enabled
        else None
    )
    model = L2RCLIP(
        image_encoder=clip.visual,
        text_encoder=PromptTextEncoder(clip, backbone.tokenizer),
        prompt_learner=prompt_learner,
        rankformer=rankformer,
        logit_scale=float(clip.logit_scale.detach()),
        train_image_tower=config.image_tower != "frozen",  # auto, unresolved: trainable
    )
    model.recipe = backbone.recipe
    return model


def build_model(backbone: Backbone, rank_space: RankSpace, config: ModelConfig) -> L2RCLIP | OrdinalHeadModel:
    """The model of `config.method`: an ordinal head for the head baselines, else L2RCLIP."""
    kind = HEAD_KINDS.get(config.method)
    if kind is None:
        return build_l2rclip(backbone, rank_space, config)
    visual = backbone.model.visual
    model = OrdinalHeadModel(
        visual,
        kind,
        len(rank_space),
        int(visual.output_dim),
        train_image_tower=config.image_tower != "frozen" and config.method != "linear_probe",
        rule=config.head_rule,
    )
    model.recipe = backbone.recipe
    return model


def resolve_image_tower(config: ModelConfig, kind: str, device: str, schedule: str) -> ModelConfig:
    """`model.image_tower: auto` made concrete for this machine and backbone (train/frozen pass through).

    The paper fine-tunes CLIP's image tower, which a GPU does in minutes; on a CPU one step of
    ViT-B-16 at batch 32 takes minutes, and the demo a day. So `auto` freezes the tower on a CPU
    with a real CLIP (`kind` `clip`): its features are encoded once and cached, and the prompts and
    RankFormer train on them. It fine-tunes (`train`) on any accelerator, for the two-stage schedule
    (its stage 2 is the fine-tuning) and for the small shipped backbones (the demo CLIP and a
    random one train in seconds, and a random tower has everything to learn).
    """
    if config.image_tower != "auto":
        return config
    frozen = torch.device(device).type == "cpu" and kind == "clip" and schedule == "one_stage"
    return dataclasses.replace(config, image_tower="frozen" if frozen else "train")


def image_tower_note(requested: ModelConfig, used: ModelConfig) -> str:
    """One line saying whether the image tower trains, and why when `auto` chose it."""
    what = {"train": "image tower fine-tuned", "frozen": "image tower frozen (features encoded once, cached)"}
    note = what[used.image_tower]
    if requested.image_tower != "auto":
        return note
    reason = (
        "a CPU with a real CLIP: a GPU would fine-tune it"
        if used.image_tower == "frozen"
        else "a GPU, the two-stage schedule or a small shipped backbone"
    )
    return f"{note} (model.image_tower auto: {reason})"


def similarity_scale(model: L2RCLIP) -> float:
    """S = exp(logit_scale): 100 for OpenAI CLIP."""
    return math.exp(float(model.logit_scale))


def fallback_config(config: ModelConfig) -> ModelConfig:
    """The model config of the offline fallback: `model.fallback.arch` with its weights.

    `model.fallback.pretrained: auto` takes the demo CLIP shipped for the arch when there is one
    (`L2RCLIP-Demo`: a real, narrow language prior learnt from drawn shapes), else random weights
    (`none`, e.g. `L2RCLIP-Tiny`: a pipeline check).
    """
    fallback = config.fallback
    pretrained = fallback.pretrained
    if pretrained == "auto":
        pretrained = DEMO_TAG if demo_weights_file(fallback.arch).is_file() else "none"
    return dataclasses.replace(config, arch=fallback.arch, pretrained=pretrained)


def planned_recipe(config: ModelConfig) -> BackboneRecipe:
    """The recipe of the backbone `resolve_backbone` will load, decided without loading any weights.

    The preprocess stage needs the backbone's preprocessing before training loads it. It reads
    only `model.arch`, `model.pretrained` and `model.fallback.{enabled,arch,pretrained}` (the params the stage
    declares in dvc.yaml), and whether the weights can be had here.
    """
    recipe = resolve_recipe(config.arch, config.pretrained, hash_file=False)
    if config.fallback.enabled and weights_unavailable_reason(recipe):
        used = fallback_config(config)
        return resolve_recipe(used.arch, used.pretrained, hash_file=False)
    return recipe


def resolve_backbone(config: ModelConfig, device: str = "cpu") -> tuple[Backbone, ModelConfig]:
    """The configured backbone, or the offline fallback when its weights cannot be had.

    The fallback (the demo CLIP by default, or a small random backbone; `fallback_config`) applies
    only with `model.fallback.enabled`, and is announced as a warning. Returns the backbone and the
    model config actually used (arch and pretrained replaced on fallback), so every output can say
    what produced it; `backbone.kind` tells which (`clip`, `demo`, `random`).
    """
    try:
        return load_backbone(config.arch, config.pretrained, device), config
    except WeightsUnavailableError as error:
        if not config.fallback.enabled:
            raise
        used = fallback_config(config)
        what = backbone_label(backbone_kind(used.arch, used.pretrained))
        log.warning("%s\nFalling back to %s with pretrained=%s: %s", error, used.arch, used.pretrained, what)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback has just been announced
        return load_backbone(used.arch, used.pretrained, device), used
