"""What every process that runs a model shares: seeding, the device it runs on, mixed precision.

Stages, training, prediction and serving import these from here, so none of them reaches into
another layer for them.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from l2rclip.config import ConfigError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch once at a stage entry."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA when available, else CPU; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but CUDA is not available here; use auto or cpu")
    return device


def autocast(device: torch.device, enabled: bool):
    """Mixed precision on CUDA (bfloat16 where supported), a no-op context elsewhere."""
    if device.type != "cuda" or not enabled:
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)
