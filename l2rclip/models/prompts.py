"""RankPromptLearner: the learnable block of the rank prompts (OrdinalCLIP's formulation).

For rank k the text input is `[SOT] c_1..c_N r_k^1..r_k^T . [EOT]` in CLIP's word-embedding
space. This module owns only the learnable part, `R` of shape (M, L, D) with L = N + T: the
context `c` (shared by all ranks, or one per rank) and the rank embeddings `r_k`.

Rank embeddings are either free per rank (`plain`, the CoOp baseline) or *interpolated* from B
base embeddings placed at linspace(0, M-1, B). Interpolation ties neighbouring ranks together,
which is the ordinal prior OrdinalCLIP introduced and L2RCLIP keeps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

INIT_STD = 0.02
INTERPOLATIONS = ("linear", "inverse_distance", "gaussian", "plain")
GAUSSIAN_UNITS = ("base_spacing", "rank")


def interpolation_weights(
    n_ranks: int,
    n_base: int,
    kind: str = "linear",
    sigma: float = 1.0,
    eps: float = 1e-3,
    unit: str = "base_spacing",
) -> torch.Tensor:
    """Weights that mix B base embeddings into M rank embeddings, rows summing to 1.

    Bases sit at p_b = linspace(0, M-1, B); d_kb = |k - p_b| in rank units.
    - linear: w = 1 - d / (M-1)
    - inverse_distance: w = 1 / (d + eps) (a rank on a base takes almost all of that base);
      ours eps = 1e-3, OrdinalCLIP's `inv_prop` 1e-5
    - gaussian: w = exp(-d^2 / (2 (sigma * u)^2)) with u the base spacing (M-1)/(B-1) (ours) or
      one rank (`unit: rank`); OrdinalCLIP's `normal`, exp(-d^2), is `unit: rank`, sigma = 1/sqrt(2)

    Returns:
        (M, B) float tensor.
    """
    if not 2 <= n_base <= n_ranks:
        raise ValueError(f"model.prompt.n_base: expected 2..{n_ranks} (the number of ranks), found {n_base}")
    if eps <= 0 or sigma <= 0:
        raise ValueError(
            f"model.prompt.inverse_distance_eps and gaussian_sigma: expected > 0, found {eps} and {sigma}"
        )
    if unit not in GAUSSIAN_UNITS:
        raise ValueError(f"model.prompt.gaussian_unit: expected one of {GAUSSIAN_UNITS}, found {unit!r}")
    ranks = torch.arange(n_ranks, dtype=torch.float64)[:, None]  # (M, 1)
    positions = torch.linspace(0, n_ranks - 1, n_base, dtype=torch.float64)[None, :]  # (1, B)
    distance = (ranks - positions).abs()  # (M, B)
    if kind == "linear":
        weights = 1.0 - distance / (n_ranks - 1)
    elif kind == "inverse_distance":
        weights = 1.0 / (distance + eps)
    elif kind == "gaussian":
        width = sigma * ((n_ranks - 1) / (n_base - 1) if unit == "base_spacing" else 1.0)
        weights = torch.exp(-(distance**2) / (2 * width**2))
    else:
        raise ValueError(
            f"model.prompt.interpolation: expected one of {INTERPOLATIONS[:3]} for "
            f"interpolated ranks, found {kind!r}"
        )
    return (weights / weights.sum(dim=1, keepdim=True)).float()


def phrase_embeddings(phrase: str, tokenizer: Any, token_embedding: nn.Embedding) -> torch.Tensor:
    """Token embeddings of a phrase without its start/end tokens, shape (n_tokens, D)."""
    tokens = tokenizer([phrase])[0]  # (context_length,)
    eot = int(tokens.argmax())  # CLIP's EOT has the largest id
    ids = tokens[1:eot]
    if len(ids) == 0:
        raise ValueError(f"phrase {phrase!r} has no tokens")
    return token_embedding.weight[ids.to(token_embedding.weight.device)].detach().clone().float()


class RankPromptLearner(nn.Module):
    """Learnable context and rank embeddings; `forward()` returns R, shape (M, N + T, D).

    Args:
        token_embedding: CLIP's (frozen) word embedding, used only to initialise.
        tokenizer: the architecture's tokenizer, used only to initialise.
        rank_names: one name per rank ("sixteen", "1950s"), used when `rank_init == "names"`.
        context_init: a phrase whose token embeddings start the context, or "random".
        n_context: N when `context_init == "random"` (otherwise N is the phrase's token count).
        context_shared: one context for all ranks (True) or one per rank.
        rank_tokens: T, learnable tokens per rank.
        rank_init: "names" (mean token embedding of each rank name) or "random".
        interpolation: "linear", "inverse_distance", "gaussian", or "plain" (free per rank).
        n_base: number of base embeddings B for interpolation.
        gaussian_sigma: width of the gaussian weights, in units of `gaussian_unit`.
        inverse_distance_eps: eps of the inverse-distance weights 1 / (d + eps).
        gaussian_unit: "base_spacing" or "rank", the unit of `gaussian_sigma`.
        rank_offsets: interpolate offsets (zero at the start) added to every rank's own initial
            embedding, instead of the embeddings themselves. OrdinalCLIP's bases start at the first
            and last rank names, so every rank in between starts as a mix of those two words and the
            language prior of the others is lost; with offsets each rank starts at its own name
            while learnt changes stay tied between neighbouring ranks [ours].
    """

    weights: torch.Tensor  # buffers of the interpolated ranks, registered in __init__
    rank_starts: torch.Tensor

    def __init__(
        self,
        token_embedding: nn.Embedding,
        tokenizer: Any,
        rank_names: Sequence[str],
        context_init: str = "random",
        n_context: int = 8,
        context_shared: bool = True,
        rank_tokens: int = 1,
        rank_init: str = "names",
        interpolation: str = "linear",
        n_base: int = 2,
        gaussian_sigma: float = 1.0,
        inverse_distance_eps: float = 1e-3,
        gaussian_unit: str = "base_spacing",
        rank_offsets: bool = True,
    ):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"model.prompt.interpolation: expected one of {INTERPOLATIONS}, found {interpolation!r}"
            )
        if rank_tokens < 1:
            raise ValueError(f"model.prompt.rank_tokens: expected >= 1, found {rank_tokens}")
        n_ranks, width = len(rank_names), token_embedding.weight.shape[1]
        self.n_ranks, self.rank_tokens, self.interpolation = n_ranks, rank_tokens, interpolation
        self.rank_offsets = rank_offsets and interpolation != "plain"

        if context_init == "random":
            if n_context < 1:
                raise ValueError(f"model.prompt.n_context: expected >= 1, found {n_context}")
            context = torch.randn(n_context, width) * INIT_STD  # (N, D)
        else:
            context = phrase_embeddings(context_init, tokenizer, token_embedding)  # (N, D)
        self.n_context = context.shape[0]
        if not context_shared:
            context = context.unsqueeze(0).repeat(n_ranks, 1, 1)  # (M, N, D)
        self.context = nn.Parameter(context)

        if rank_init == "names":
            names = torch.stack(
                [phrase_embeddings(name, tokenizer, token_embedding).mean(dim=0) for name in rank_names]
            )  # (M, D)
        elif rank_init == "random":
            names = torch.randn(n_ranks, width) * INIT_STD  # (M, D)
        else:
            raise ValueError(f"model.prompt.rank_init: expected 'names' or 'random', found {rank_init!r}")
        names = names.unsqueeze(1).repeat(1, rank_tokens, 1)  # (M, T, D)

        if interpolation == "plain":
            self.rank_embeddings = nn.Parameter(names)  # (M, T, D)
        else:
            self.register_buffer(
                "weights",
                interpolation_weights(
                    n_ranks, n_base, interpolation, gaussian_sigma, inverse_distance_eps, gaussian_unit
                ),
            )  # (M, B)
            if self.rank_offsets:
                self.register_buffer("rank_starts", names.clone())  # (M, T, D), fixed
                self.base_embeddings = nn.Parameter(torch.zeros(n_base, rank_tokens, width))  # (B, T, D)
            else:
                anchors = torch.linspace(0, n_ranks - 1, n_base).round().long()  # nearest rank to each base
                self.base_embeddings = nn.Parameter(names[anchors].clone())  # (B, T, D)

    @property
    def length(self) -> int:
        """L = N + T, the number of learnable token slots per rank."""
        return self.n_context + self.rank_tokens

    def rank_block(self) -> torch.Tensor:
        """The rank embeddings r_k, shape (M, T, D)."""
        if self.interpolation == "plain":
            return self.rank_embeddings
        mixed = torch.einsum("mb,btd->mtd", self.weights, self.base_embeddings)  # (M, T, D)
        return self.rank_starts + mixed if self.rank_offsets else mixed

    def forward(self) -> torch.Tensor:
        """The learnable prompt block R, shape (M, N + T, D)."""
        context: torch.Tensor = self.context
        if context.dim() == 2:
            context = context.unsqueeze(0).expand(self.n_ranks, -1, -1)  # (M, N, D)
        return torch.cat([context, self.rank_block()], dim=1)  # (M, L, D)
