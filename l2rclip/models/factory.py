"""Assembling an L2RCLIP model from a loaded backbone and the `model` section of params.yaml."""

from __future__ import annotations

import dataclasses
import math

from l2rclip.config import ModelConfig
from l2rclip.models.backbone import Backbone
from l2rclip.models.l2rclip import L2RCLIP
from l2rclip.models.prompts import RankPromptLearner
from l2rclip.models.rankformer import RankFormer
from l2rclip.models.text_encoder import PromptTextEncoder
from l2rclip.ranks import RankSpace


def build_l2rclip(backbone: Backbone, rank_space: RankSpace, config: ModelConfig) -> L2RCLIP:
    """Build the model: prompts initialised from the backbone's word embeddings, frozen text tower."""
    clip = backbone.model
    prompt_learner = RankPromptLearner(clip.token_embedding, backbone.tokenizer, rank_space.names,
                                       **dataclasses.asdict(config.prompt))
    rankformer_options = dataclasses.asdict(config.rankformer)
    rankformer = (RankFormer(len(rank_space), clip.token_embedding.weight.shape[1],
                             **{k: v for k, v in rankformer_options.items() if k != "enabled"})
                  if config.rankformer.enabled else None)
    return L2RCLIP(image_encoder=clip.visual, text_encoder=PromptTextEncoder(clip, backbone.tokenizer),
                   prompt_learner=prompt_learner, rankformer=rankformer,
                   logit_scale=float(clip.logit_scale.detach()),
                   train_image_tower=config.image_tower == "train")


def similarity_scale(model: L2RCLIP) -> float:
    """S = exp(logit_scale): 100 for OpenAI CLIP."""
    return math.exp(float(model.logit_scale))
