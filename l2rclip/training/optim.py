"""Optimiser and learning-rate schedule: per-module groups, linear warm-up then cosine decay."""

from __future__ import annotations

import math

import torch

OPTIMIZERS = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam, "adamw": torch.optim.AdamW}


def build_optimizer(groups: list[dict], name: str) -> torch.optim.Optimizer:
    """The optimiser `name` over parameter groups that carry their own lr and weight decay."""
    if not groups:
        raise ValueError(
            "nothing to train: every parameter group is frozen (check model.image_tower and train.schedule)"
        )
    if name not in OPTIMIZERS:
        raise ValueError(f"train.optimizer: expected one of {', '.join(OPTIMIZERS)}, found {name!r}")
    return OPTIMIZERS[name](groups)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Scale every group's lr linearly from ~0 to 1 over `warmup_steps`, then down to 0 by cosine.

    Stepped once per optimisation step, so the shape does not depend on the epoch length.
    """
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
