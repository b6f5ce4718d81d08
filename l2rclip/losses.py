"""Loss terms of L2RCLIP (docs/method.md, section 3) and their weighted sum.

Notation: B images with rank indices ``labels`` (B,) in 0..M-1, L2-normalised image features
``v`` (B, E), L2-normalised rank prototypes ``t`` (M, E), logits ``z = scale * v @ t.T`` (B, M) and
``rank_values`` (M,), the numeric value of each rank (e.g. an age). Every function returns a scalar
tensor (``cross_modal_ordinal_pairwise_loss`` a dict of scalars) so that each term can be logged.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from l2rclip.config import LossConfig

logger = logging.getLogger(__name__)

# Floor under squared distances before the square root: d sqrt(x)/dx is infinite at 0, which
# turns into NaN gradients as soon as an image feature coincides with a prototype.
_MIN_SQUARED_DISTANCE = 1e-12
_TERM_KEYS = ("ce", "kl_t2i", "cop", "cop_batch", "supcon")
# OrdinalCLIP's text->image target is softmax(KL_TARGET_SHARPNESS * one_hot) over the images.
KL_TARGET_SHARPNESS = 10.0


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors: in fp16 the 1e-12 floor underflows to 0 (and sqrt(0) again)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _safe_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between all rows of ``a`` (P, E) and ``b`` (Q, E), with finite gradients.

    Uses ``|a|^2 + |b|^2 - 2 a.b`` (memory O(P*Q), not O(P*Q*E)) and clamps before the square
    root, which also absorbs the small negative values that rounding can produce.
    """
    squared = a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1).unsqueeze(0) - 2.0 * a @ b.T  # (P, Q)
    return squared.clamp(min=_MIN_SQUARED_DISTANCE).sqrt()


def _safe_row_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between matching rows of ``a`` and ``b`` (P, E) -> (P,), finite gradients."""
    return (a - b).pow(2).sum(-1).clamp(min=_MIN_SQUARED_DISTANCE).sqrt()


def _normalise_weights(w: torch.Tensor) -> torch.Tensor:
    """``(w - min w) / max w`` over all entries; all zeros when ``max w`` is 0 (a single rank)."""
    return (w - w.min()) / w.max().clamp(min=torch.finfo(w.dtype).tiny)


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Image-to-text cross-entropy: each image (row of ``logits`` (B, M)) should pick its own rank."""
    return F.cross_entropy(logits, labels)


def kl_t2i_loss(logits: torch.Tensor, labels: torch.Tensor, target: str = "uniform") -> torch.Tensor:
    """OrdinalCLIP's text-to-image term: each present rank should pick out its own images.

    For every rank k present in the batch, the softmax over images of column ``logits[:, k]`` is
    pulled towards a target over the images with KL(target || pred). Absent ranks have no target
    and are skipped; the result is the mean over present ranks.

    Args:
        logits: (B, M) image-text logits.
        labels: (B,) rank indices.
        target: ``uniform`` (ours: exactly uniform over the images labelled k, 0 elsewhere) or
            ``softmax10`` (OrdinalCLIP's code: ``softmax(10 * one_hot)`` over the images, which
            leaves a weight ``1 / (n_k e^10 + B - n_k)`` on every other image).

    Returns:
        Scalar loss, 0 when every column softmax equals its target.
    """
    log_pred = F.log_softmax(_full_precision(logits), dim=0)  # (B, M), normalised over images
    one_hot = F.one_hot(labels, logits.shape[1]).to(log_pred.dtype)  # (B, M)
    counts = one_hot.sum(0)  # (M,)
    if target == "uniform":
        goal = one_hot / counts.clamp(min=1.0)  # (B, M), columns of present ranks sum to 1
    elif target == "softmax10":
        goal = (KL_TARGET_SHARPNESS * one_hot).softmax(dim=0) * (counts > 0)  # (B, M), absent: 0
    else:
        raise ValueError(f"loss.kl_t2i_target: expected 'uniform' or 'softmax10', found {target!r}")
    kl = (torch.xlogy(goal, goal) - goal * log_pred).sum(0)  # (M,), 0 for absent ranks
    return kl[counts > 0].mean()


def ordinal_weights(labels: torch.Tensor, rank_values: torch.Tensor) -> torch.Tensor:
    """Ordinal distance of every image's true rank to every rank, normalised to [0, 1].

    ``W_ik = |value(y_i) - value_k|`` then ``W <- (W - min W) / max W`` over the batch, so the true
    rank gets weight 0 and the farthest rank weight 1: far ranks are pushed away hardest.

    Args:
        labels: (B,) rank indices.
        rank_values: (M,) numeric value of each rank.

    Returns:
        (B, M) weights, all zeros if every rank has the same value.
    """
    values = _full_precision(rank_values)
    w = (values[labels].unsqueeze(1) - values.unsqueeze(0)).abs()  # (B, M)
    return _normalise_weights(w)


def cross_modal_ordinal_pairwise_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    rank_values: torch.Tensor,
    tightness_weight: float = 1.0,
    diversity_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """L2RCLIP's cross-modal ordinal pairwise loss (``cop``).

    CE bounds a pairwise loss made of a tightness and a contrastive term; L2RCLIP moves that loss
    into the joint image-text space and weights each negative rank by its ordinal distance:
    ``L_t = mean_i ||v_i - t_{y_i}||^2`` pulls an image to its prototype and
    ``L_d = -mean_{i,k} W_ik ||v_i - t_k||`` pushes it away from far ranks more than near ones.

    Args:
        image_features: (B, E) L2-normalised image features.
        text_features: (M, E) L2-normalised rank prototypes.
        labels: (B,) rank indices.
        rank_values: (M,) numeric value of each rank.
        tightness_weight: weight ``w_t`` of ``L_t`` in the total.
        diversity_weight: weight ``w_d`` of ``L_d`` in the total.

    Returns:
        ``{"tightness": L_t, "diversity": L_d, "total": w_t * L_t + w_d * L_d}``.
    """
    v, t = _full_precision(image_features), _full_precision(text_features)
    tightness = (v - t[labels]).pow(2).sum(-1).mean()
    weights = ordinal_weights(labels, rank_values).to(v.dtype)  # (B, M)
    diversity = -(weights * _safe_distances(v, t)).mean()
    total = tightness_weight * tightness + diversity_weight * diversity
    return {"tightness": tightness, "diversity": diversity, "total": total}


def cop_batch_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    weights: str = "matrix",
) -> torch.Tensor:
    """In-batch variant of ``cop``, used in two-stage training with cached image features.

    Over the pairs (i, j), i < j, of the batch, with ``w_ij`` the rank-index gaps ``|y_i - y_j|``
    normalised ``(w - min) / max`` like :func:`ordinal_weights`,
    ``L_d = -mean w_ij ||v_i - t_{y_j}||`` pushes images from the prototypes of far-ranked batch
    mates and ``L_center = -mean w_ij ||t_{y_i} - t_{y_j}||`` spreads the prototypes themselves
    ordinally. Total ``L_d + 0.5 L_t + 0.5 L_center`` with ``L_t`` the tightness of
    :func:`cross_modal_ordinal_pairwise_loss`. A batch of one image has
    no pairs; both pair terms are then 0 and the result is ``0.5 L_t``.

    Args:
        image_features: (B, E) L2-normalised image features.
        text_features: (M, E) L2-normalised rank prototypes.
        labels: (B,) rank indices.
        weights: where min and max are taken: ``matrix`` (ours: over the (B, B) gap matrix, whose
            zero diagonal fixes min = 0) or ``pairs`` (the authors' ``ordinal_entropy_stage1``: over
            the pairs i < j only, so in a batch without repeated labels the closest pairs get 0).
            All-equal weights (one pair, or one label) are 0, never NaN.

    Returns:
        Scalar loss.
    """
    v, t = _full_precision(image_features), _full_precision(text_features)
    proto = t[labels]  # (B, E), each image's own prototype
    tightness = (v - proto).pow(2).sum(-1).mean()
    first, second = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)  # (P,)
    if first.numel() == 0:
        return 0.5 * tightness
    gaps = (labels.unsqueeze(1) - labels.unsqueeze(0)).abs().to(v.dtype)  # (B, B)
    if weights == "matrix":
        w = _normalise_weights(gaps)[first, second]  # (P,)
    elif weights == "pairs":
        w = _normalise_weights(gaps[first, second])  # (P,)
    else:
        raise ValueError(f"loss.cop_batch_weights: expected 'matrix' or 'pairs', found {weights!r}")
    diversity = -(w * _safe_row_distances(v[first], proto[second])).mean()
    center = -(w * _safe_row_distances(proto[first], proto[second])).mean()
    return diversity + 0.5 * tightness + 0.5 * center


def supcon_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Supervised contrastive loss between images and rank prototypes, in both directions (ours).

    Image->text: cross-entropy of each image over the M prototypes, positive ``t_{y_i}``.
    Text->image: for each rank present in the batch, minus the mean log-probability (softmax over
    batch images) of the images with that label; averaged over present ranks. The result is the
    mean of the two directions, so prototypes learn from batch labels without a trained image tower.
    :func:`reference_supcon_loss` is the authors' form.

    Args:
        image_features: (B, E) L2-normalised image features.
        text_features: (M, E) L2-normalised rank prototypes.
        labels: (B,) rank indices.
        temperature: softmax temperature (CLIP-like 0.07).

    Returns:
        Scalar loss.
    """
    v, t = _full_precision(image_features), _full_precision(text_features)
    similarity = v @ t.T / temperature  # (B, M)
    image_to_text = F.cross_entropy(similarity, labels)
    log_prob = F.log_softmax(similarity.T, dim=1)  # (M, B), over images
    positives = F.one_hot(labels, t.shape[0]).T.to(log_prob.dtype)  # (M, B)
    counts = positives.sum(1)  # (M,)
    present = counts > 0
    mean_log_prob = (positives * log_prob).sum(1)[present] / counts[present]  # (present ranks,)
    text_to_image = -mean_log_prob.mean()
    return 0.5 * (image_to_text + text_to_image)


def _mean_positive_log_prob(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """``-mean_rows( mean over positive columns of log_softmax(row) )`` for (P, Q) logits and mask."""
    log_prob = F.log_softmax(logits, dim=1)  # (P, Q)
    return -((positives * log_prob).sum(1) / positives.sum(1)).mean()


def reference_supcon_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """The authors' stage-1 supervised contrastive loss (CLIP-ReID's ``SupConLoss`` call).

    The text side is the batch labels' prototypes ``u_j = t_{y_j}`` (B of them, repeated labels
    repeated), logits ``s <v_i, u_j>`` with ``s = exp(logit_scale)`` (100 for OpenAI CLIP), and the
    positives of a row are the columns with the same label. Image->text: rows are images, the
    softmax runs over the B batch-label prototypes only (not all M); text->image: rows are the
    B prototypes, the softmax runs over the images. Loss = i2t + t2i (a sum, not a mean).

    Args:
        image_features: (B, E) L2-normalised image features.
        text_features: (M, E) L2-normalised rank prototypes.
        labels: (B,) rank indices.
        logit_scale: the model's log similarity scale (a scalar tensor or float).

    Returns:
        Scalar loss.
    """
    v, t = _full_precision(image_features), _full_precision(text_features)
    scale = torch.as_tensor(logit_scale, dtype=v.dtype, device=v.device).exp()
    logits = scale * v @ t[labels].T  # (B, B): image i vs prototype of image j's label
    positives = (labels.unsqueeze(1) == labels.unsqueeze(0)).to(v.dtype)  # (B, B), symmetric
    return _mean_positive_log_prob(logits, positives) + _mean_positive_log_prob(logits.T, positives)


class OrdinalLoss(torch.nn.Module):
    """Weighted sum of the named loss terms, configured by the ``loss`` section of params.yaml.

    Terms with weight 0 are not computed (so a run pays only for what it uses). ``forward``
    returns every computed term unweighted under ``<name>_loss`` plus the total under ``loss``,
    so that every term can be logged.
    """

    rank_values: torch.Tensor  # (M,), a buffer registered in __init__

    def __init__(
        self,
        rank_values: Sequence[float],
        ce: float = 1.0,
        kl_t2i: float = 1.0,
        cop: float = 1.0,
        cop_batch: float = 0.0,
        supcon: float = 0.0,
        cop_tightness: float = 1.0,
        cop_diversity: float = 1.0,
        supcon_temperature: float = 0.07,
        supcon_form: str = "ours",
        cop_batch_weights: str = "matrix",
        kl_t2i_target: str = "uniform",
    ) -> None:
        super().__init__()
        self.weights = {"ce": ce, "kl_t2i": kl_t2i, "cop": cop, "cop_batch": cop_batch, "supcon": supcon}
        negative = {f"loss.{k}": w for k, w in self.weights.items() if w < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, found {negative}")
        if all(w == 0 for w in self.weights.values()):
            keys = ", ".join(f"loss.{k}" for k in _TERM_KEYS)
            raise ValueError(f"all loss weights are 0; set at least one of {keys} > 0")
        if supcon_temperature <= 0:
            raise ValueError(f"loss.supcon_temperature must be > 0, found {supcon_temperature}")
        self.cop_tightness = cop_tightness
        self.cop_diversity = cop_diversity
        self.supcon_temperature = supcon_temperature
        choices = {
            "loss.supcon_form": (supcon_form, ("ours", "reference")),
            "loss.cop_batch_weights": (cop_batch_weights, ("matrix", "pairs")),
            "loss.kl_t2i_target": (kl_t2i_target, ("uniform", "softmax10")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{key}: expected one of {allowed}, found {value!r}")
        self.supcon_form, self.cop_batch_weights = supcon_form, cop_batch_weights
        self.kl_t2i_target = kl_t2i_target
        # Not persistent: rank values belong to the RankSpace saved with the model, not to this module.
        self.register_buffer(
            "rank_values", torch.as_tensor(rank_values, dtype=torch.float32), persistent=False
        )  # (M,)
        logger.debug("OrdinalLoss weights %s", self.weights)

    @classmethod
    def from_config(cls, config: LossConfig, rank_values: Sequence[float]) -> OrdinalLoss:
        """Build from the ``loss`` section of params.yaml and the rank values of the RankSpace."""
        return cls(
            rank_values,
            ce=config.ce,
            kl_t2i=config.kl_t2i,
            cop=config.cop,
            cop_batch=config.cop_batch,
            supcon=config.supcon,
            cop_tightness=config.cop_tightness,
            cop_diversity=config.cop_diversity,
            supcon_temperature=config.supcon_temperature,
            supcon_form=config.supcon_form,
            cop_batch_weights=config.cop_batch_weights,
            kl_t2i_target=config.kl_t2i_target,
        )

    def forward(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compute the enabled terms and their weighted sum.

        Args:
            outputs: model outputs with ``logits`` (B, M), ``image_features`` (B, E),
                ``text_features`` (M, E) and (for ``supcon_form: reference``) the scalar
                ``logit_scale``; only the keys the enabled terms need are read.
            labels: (B,) rank indices.

        Returns:
            ``{"<term>_loss": value, ..., "loss": weighted sum}``; with ``cop`` on, also
            ``cop_tightness_loss`` and ``cop_diversity_loss``.
        """
        labels = labels.long()
        n_ranks = self.rank_values.shape[0]
        terms: dict[str, torch.Tensor] = {}
        if self.weights["ce"] or self.weights["kl_t2i"]:
            logits = self._get(outputs, "logits", n_ranks, dim=1)
            if self.weights["ce"]:
                terms["ce_loss"] = cross_entropy_loss(logits, labels)
            if self.weights["kl_t2i"]:
                terms["kl_t2i_loss"] = kl_t2i_loss(logits, labels, self.kl_t2i_target)
        if self.weights["cop"] or self.weights["cop_batch"] or self.weights["supcon"]:
            image = outputs["image_features"]
            text = self._get(outputs, "text_features", n_ranks, dim=0)
            if self.weights["cop"]:
                cop = cross_modal_ordinal_pairwise_loss(
                    image, text, labels, self.rank_values, self.cop_tightness, self.cop_diversity
                )
                terms["cop_loss"] = cop["total"]
            if self.weights["cop_batch"]:
                terms["cop_batch_loss"] = cop_batch_loss(image, text, labels, self.cop_batch_weights)
            if self.weights["supcon"] and self.supcon_form == "reference":
                terms["supcon_loss"] = reference_supcon_loss(image, text, labels, outputs["logit_scale"])
            elif self.weights["supcon"]:
                terms["supcon_loss"] = supcon_loss(image, text, labels, self.supcon_temperature)
        # At least one weight is > 0 (checked in __init__), so there is at least one term to add.
        total = functools.reduce(
            operator.add, (self.weights[name[: -len("_loss")]] * value for name, value in terms.items())
        )
        if self.weights["cop"]:
            terms["cop_tightness_loss"] = cop["tightness"]
            terms["cop_diversity_loss"] = cop["diversity"]
        terms["loss"] = total
        return terms

    @staticmethod
    def _get(outputs: Mapping[str, torch.Tensor], key: str, n_ranks: int, dim: int) -> torch.Tensor:
        """Fetch ``outputs[key]`` and check that its rank axis matches the rank values."""
        value = outputs[key]
        if value.shape[dim] != n_ranks:
            raise ValueError(
                f"outputs[{key!r}] has shape {tuple(value.shape)}, expected {n_ranks} ranks on dim {dim} "
                f"(the length of rank_values)"
            )
        return value
