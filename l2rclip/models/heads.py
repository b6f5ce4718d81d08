"""Classic ordinal heads on CLIP's image tower: the baselines without text.

- `linear`: a linear layer on frozen features, fitted by scikit-learn's logistic regression (the
  linear probe of the CLIP paper), stored as plain weights;
- `coral`: CORAL (Cao et al. 2020), M-1 binary "rank > k" tasks sharing one weight vector;
- `corn`: CORN (Shi et al. 2023), M-1 conditional "rank > k given rank > k-1" tasks.
CORAL and CORN come from `coral-pytorch`. All three turn their outputs into a distribution over
the M ranks, so the same metrics (both prediction rules, calibration) apply as for L2RCLIP.
CORAL and CORN also have a published hard rule, the number of P(y > k) > 0.5 (`rule: threshold`,
as `coral_pytorch.dataset.proba_to_label`); `predict_ranks` gives it, and evaluation scores them
with it. `rule: mode` scores them like every other model (argmax and expectation of p).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from coral_pytorch.dataset import levels_from_labelbatch
from coral_pytorch.layers import CoralLayer
from coral_pytorch.losses import coral_loss, corn_loss
from torch import nn

if TYPE_CHECKING:
    from l2rclip.models.recipe import BackboneRecipe

HEADS = ("linear", "coral", "corn")
RULES = ("threshold", "mode")


class OrdinalHeadModel(nn.Module):
    """Image tower + an ordinal head; same call and output conventions as `L2RCLIP`.

    Args:
        image_encoder: CLIP's image tower.
        kind: "linear", "coral" or "corn".
        n_ranks: M.
        width: image feature width E.
        train_image_tower: whether the image tower receives gradients.
        rule: CORAL/CORN's hard prediction, "threshold" (published) or "mode" (argmax of p).
    """

    recipe: BackboneRecipe  # set by l2rclip.models.factory.build_model

    def __init__(
        self,
        image_encoder: nn.Module,
        kind: str,
        n_ranks: int,
        width: int,
        train_image_tower: bool = True,
        rule: str = "threshold",
    ):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"expected a head kind in {HEADS}, found {kind!r}")
        if rule not in RULES:
            raise ValueError(f"model.head_rule: expected one of {RULES}, found {rule!r}")
        self.kind, self.n_ranks, self.rule = kind, n_ranks, rule
        self.image_encoder = image_encoder
        if kind == "coral":
            self.head = CoralLayer(width, n_ranks)  # (E) -> (M-1) logits, shared weights
        else:
            self.head = nn.Linear(width, n_ranks if kind == "linear" else n_ranks - 1)
        self.set_trainable(image_tower=train_image_tower, prompts=True)

    def set_trainable(self, image_tower: bool, prompts: bool) -> None:
        """Freeze or unfreeze the image tower; the head (this model's 'prompts') follows `prompts`."""
        for param in self.image_encoder.parameters():
            param.requires_grad_(image_tower)
        for param in self.head.parameters():
            param.requires_grad_(prompts)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images (B, 3, H, W) into L2-normalised features (B, E), as the feature cache stores them."""
        return F.normalize(self.image_encoder(images).float(), dim=-1)

    def prototypes(self) -> None:
        """Heads have no text prototypes."""
        return None

    def cache_prototypes(self) -> None:
        """Nothing to cache: heads have no text prototypes."""
        return None

    def forward(
        self,
        images: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`logits` (B, M) for linear, (B, M-1) for CORAL/CORN; `image_features` (B, E)."""
        if image_features is None:
            if images is None:
                raise ValueError("OrdinalHeadModel.forward: expected images or image_features, found neither")
            image_features = self.encode_images(images)
        return {"logits": self.head(image_features), "image_features": image_features}

    def rank_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Distribution over the M ranks, (B, M), from the head's logits.

        CORAL gives P(y > k) directly; CORN gives P(y > k | y > k-1), whose running product is
        P(y > k). Differences of the survival function are the rank probabilities; CORAL's can dip
        below zero when its biases are not ordered, so they are clipped and renormalised.
        """
        if self.kind == "linear":
            return logits.softmax(dim=1)
        above = self._survival(logits)  # (B, M-1)
        ones, zeros = torch.ones_like(above[:, :1]), torch.zeros_like(above[:, :1])
        survival = torch.cat([ones, above, zeros], dim=1)  # (B, M+1): P(y > k-1) for k = 0..M
        probs = (survival[:, :-1] - survival[:, 1:]).clamp(min=0.0)  # (B, M)
        return probs / probs.sum(dim=1, keepdim=True).clamp(min=1e-12)

    @property
    def has_point_rule(self) -> bool:
        """Whether `predict_ranks` is a rule of its own (CORAL/CORN threshold), not the argmax of p."""
        return self.kind != "linear" and self.rule == "threshold"

    def predict_ranks(self, logits: torch.Tensor) -> torch.Tensor:
        """Hard predictions (B,): the count of P(y > k) > 0.5 (threshold rule), else argmax of p."""
        if not self.has_point_rule:
            return self.rank_probabilities(logits).argmax(dim=1)
        return (self._survival(logits) > 0.5).sum(dim=1)

    def _survival(self, logits: torch.Tensor) -> torch.Tensor:
        """P(y > k), (B, M-1): CORAL's sigmoids, CORN's running product of conditional sigmoids."""
        above = torch.sigmoid(logits)
        return torch.cumprod(above, dim=1) if self.kind == "corn" else above

    def param_groups(self, lr_head: float, lr_image: float, weight_decay: float = 0.0) -> list[dict]:
        """Optimiser groups: the head and (when trainable) the image tower."""
        groups = [("head", self.head, lr_head), ("image_tower", self.image_encoder, lr_image)]
        return [
            {"name": name, "params": params, "lr": lr, "weight_decay": weight_decay}
            for name, module, lr in groups
            if (params := [p for p in module.parameters() if p.requires_grad])
        ]


class HeadLoss(nn.Module):
    """The training loss of a head: CE (linear), CORAL or CORN; returns named terms like OrdinalLoss."""

    def __init__(self, kind: str, n_ranks: int):
        super().__init__()
        self.kind, self.n_ranks = kind, n_ranks

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """`<kind>_loss` and `loss` for logits (B, M or M-1) and labels (B,)."""
        logits = outputs["logits"].float()
        if self.kind == "coral":
            value = coral_loss(logits, levels_from_labelbatch(labels, self.n_ranks).to(logits.device))
        elif self.kind == "corn":
            value = corn_loss(logits, labels, self.n_ranks)
        else:
            value = F.cross_entropy(logits, labels)
        return {f"{self.kind}_loss": value, "loss": value}
