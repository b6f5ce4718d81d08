"""RankFormer: L2RCLIP's prompt tuner, letting rank prompts exchange information.

It acts on the learnable prompt block R (M ranks, L token slots, width D) *before* the frozen
text encoder. With `attention="token"` (our reading of the paper's token-level attention, the one
that matches "enhance the ordering relation"), every token slot l runs self-attention across the
M ranks: the sequence axis is the ranks, the batch axis is the slots. `attention="full"` attends
over all M*L tokens at once.

Residual prompt blending: R' = R + alpha * delta(R), alpha a learnable scalar. The output
projections of the attention and the MLP start at zero, so delta(R) = 0 and training begins
exactly at the OrdinalCLIP prompts; the block only moves them as far as the loss asks.
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTIONS = ("token", "full")


class RankFormerBlock(nn.Module):
    """Pre-LayerNorm transformer block whose output projections are zero-initialised."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"model.rankformer.heads: {heads} does not divide the prompt width {width}")
        self.norm_attn = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        mlp_in, mlp_out = nn.Linear(width, hidden), nn.Linear(hidden, width)  # in this order: the same draws
        self.mlp = nn.Sequential(mlp_in, nn.GELU(), nn.Dropout(dropout), mlp_out)
        for projection in (self.attn.out_proj, mlp_out):
            nn.init.zeros_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, sequence, D) -> same shape."""
        h = self.norm_attn(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


class RankFormer(nn.Module):
    """Attention across ranks on the prompt block, blended back residually.

    Args:
        n_ranks: M.
        width: D, the word-embedding width of the text tower.
        layers: number of blocks.
        heads: attention heads (must divide D).
        mlp_ratio: hidden width of the MLP relative to D.
        attention: "token" (per slot, across ranks) or "full" (over all M*L tokens).
        rank_position: add a learnable rank-position embedding before attention.
        alpha_init: initial value of the learnable blending scalar alpha.
        dropout: dropout inside attention and MLP.
    """

    def __init__(
        self,
        n_ranks: int,
        width: int,
        layers: int = 1,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        attention: str = "token",
        rank_position: bool = False,
        alpha_init: float = 0.1,
        dropout: float = 0.0,
    ):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"model.rankformer.attention: expected one of {ATTENTIONS}, found {attention!r}")
        if layers < 1:
            raise ValueError(f"model.rankformer.layers: expected >= 1, found {layers}")
        self.attention = attention
        self.blocks = nn.Sequential(*[RankFormerBlock(width, heads, mlp_ratio, dropout) for _ in range(layers)])
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.rank_position = nn.Parameter(torch.randn(n_ranks, 1, width) * 0.02) if rank_position else None

    def delta(self, prompts: torch.Tensor) -> torch.Tensor:
        """The update delta(R), shape (M, L, D); zero at initialisation."""
        n_ranks, length, width = prompts.shape
        h = prompts if self.rank_position is None else prompts + self.rank_position  # (M, L, D)
        if self.attention == "token":
            h = h.transpose(0, 1)  # (L, M, D): batch = token slots, sequence = ranks
            return (self.blocks(h) - h).transpose(0, 1)  # (M, L, D)
        h = h.reshape(1, n_ranks * length, width)  # (1, M*L, D)
        return (self.blocks(h) - h).reshape(n_ranks, length, width)  # (M, L, D)

    def forward(self, prompts: torch.Tensor) -> torch.Tensor:
        """R' = R + alpha * delta(R); prompts (M, L, D) -> (M, L, D)."""
        return prompts + self.alpha * self.delta(prompts)
