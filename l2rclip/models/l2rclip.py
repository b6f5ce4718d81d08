"""The L2RCLIP model: image features, rank prototypes and ordinal logits.

Data flow (shapes for M ranks, batch B, prompt slots L, word width D, embedding width E):

    RankPromptLearner() -> R (M, L, D) -> RankFormer -> R' (M, L, D)
        -> PromptTextEncoder (frozen, truncated at EOT) -> prototypes t (M, E)
    images (B, 3, H, W) -> image tower -> v (B, E)
    logits z = s * v @ t.T  (B, M),  s = exp(logit_scale), frozen

Prompts do not depend on the image, so the M prototypes are computed once per training step and,
for inference, once in total: `cache_prototypes()` stores them in a (saved) buffer and evaluation
then never touches the text tower.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from l2rclip.models.prompts import RankPromptLearner
from l2rclip.models.rankformer import RankFormer
from l2rclip.models.text_encoder import PromptTextEncoder

if TYPE_CHECKING:
    from l2rclip.models.recipe import BackboneRecipe

log = logging.getLogger(__name__)


class L2RCLIP(nn.Module):
    """CLIP with learnable rank prompts, an optional RankFormer, and a frozen text tower.

    Args:
        image_encoder: CLIP's image tower (`clip.visual`), trainable or frozen.
        text_encoder: the frozen prompt text encoder.
        prompt_learner: the learnable prompt block.
        rankformer: the prompt tuner, or None for plain OrdinalCLIP/CoOp prompts.
        logit_scale: log of the similarity scale s (kept frozen, as in the paper).
        train_image_tower: whether the image tower receives gradients.
    """

    has_point_rule = False  # hard predictions are the argmax of p (see OrdinalHeadModel)
    logit_scale: torch.Tensor  # buffers, registered in __init__
    cached_prototypes: torch.Tensor
    recipe: BackboneRecipe  # set by l2rclip.models.factory.build_l2rclip

    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: PromptTextEncoder,
        prompt_learner: RankPromptLearner,
        rankformer: RankFormer | None,
        logit_scale: float,
        train_image_tower: bool = True,
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.prompt_learner = prompt_learner
        self.rankformer = rankformer
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.register_buffer("cached_prototypes", torch.empty(0))
        self.set_trainable(image_tower=train_image_tower, prompts=True)

    @property
    def n_ranks(self) -> int:
        """M."""
        return self.prompt_learner.n_ranks

    def set_trainable(self, image_tower: bool, prompts: bool) -> None:
        """Freeze or unfreeze the image tower and the prompts + RankFormer (two-stage switches both)."""
        for param in self.image_encoder.parameters():
            param.requires_grad_(image_tower)
        for part in (self.prompt_learner, self.rankformer):
            for param in [] if part is None else part.parameters():
                param.requires_grad_(prompts)

    def prompt_block(self) -> torch.Tensor:
        """R' = RankFormer(R), or R when RankFormer is off; shape (M, L, D)."""
        prompts = self.prompt_learner()  # (M, L, D)
        return prompts if self.rankformer is None else self.rankformer(prompts)

    def compute_prototypes(self, truncate: bool = True) -> torch.Tensor:
        """Encode all M prompts now (with gradients when enabled): (M, E), L2-normalised."""
        return self.text_encoder(self.prompt_block(), truncate=truncate)

    def prototypes(self) -> torch.Tensor:
        """The cached prototypes in eval mode when present, else freshly computed; (M, E)."""
        if not self.training and self.cached_prototypes.numel():
            return self.cached_prototypes
        return self.compute_prototypes()

    @torch.no_grad()
    def cache_prototypes(self) -> torch.Tensor:
        """Compute the prototypes once and keep them (saved with the model) for inference.

        A cache that is already there is kept: it is either this method's own result or fixed
        prototypes set on purpose (zero-shot CLIP's hand-written prompts). Training drops it.
        """
        if self.training or not self.cached_prototypes.numel():
            self.cached_prototypes = self.compute_prototypes().detach()
        return self.cached_prototypes

    def rank_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Rank distribution p = softmax(z): (B, M)."""
        return logits.softmax(dim=1)

    def train(self, mode: bool = True) -> L2RCLIP:
        """Switching to training drops the prototype cache, which training would make stale."""
        if mode:
            self.cached_prototypes = torch.empty(0, device=self.logit_scale.device)
        return super().train(mode)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> L2-normalised features (B, E)."""
        return F.normalize(self.image_encoder(images).float(), dim=-1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Z = s * v @ t.T: (B, E) x (M, E) -> (B, M)."""
        return self.logit_scale.exp() * image_features @ text_features.t()

    def forward(
        self,
        images: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Logits for a batch of images, or for precomputed (cached) image features.

        Args:
            images: (B, 3, H, W); ignored when `image_features` is given.
            image_features: L2-normalised (B, E), e.g. from a frozen-tower feature cache.
            text_features: prototypes (M, E) to reuse; computed (once) when omitted.

        Returns:
            dict with `logits` (B, M), `image_features` (B, E), `text_features` (M, E) and the
            scalar `logit_scale` (the reference supcon loss scales by its exp).
        """
        if image_features is None:
            if images is None:
                raise ValueError("L2RCLIP.forward: expected images or image_features, found neither")
            image_features = self.encode_images(images)  # (B, E)
        if text_features is None:
            text_features = self.prototypes()  # (M, E)
        return {
            "logits": self.logits(image_features, text_features),
            "image_features": image_features,
            "text_features": text_features,
            "logit_scale": self.logit_scale,
        }

    def param_groups(
        self, lr_prompt: float, lr_rankformer: float, lr_image: float, weight_decay: float = 0.0
    ) -> list[dict]:
        """Optimiser parameter groups by module, each with its own learning rate.

        Only parameters that require gradients are included, so the frozen text tower (and a frozen
        image tower) never enter the optimiser. Empty groups are left out.
        """
        groups = [
            ("prompts", self.prompt_learner, lr_prompt),
            ("rankformer", self.rankformer, lr_rankformer),
            ("image_tower", self.image_encoder, lr_image),
        ]
        result = []
        for name, module, lr in groups:
            params = [] if module is None else [p for p in module.parameters() if p.requires_grad]
            if params:
                result.append({"name": name, "params": params, "lr": lr, "weight_decay": weight_decay})
        return result
