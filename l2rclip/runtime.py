"""What every process that runs a model shares: seeding, the device it runs on, mixed precision.

Stages, training, prediction and serving import these from here, so none of them reaches into
another layer for them.
"""

from __future__ import annotations

import platform
import random
from typing import Any

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


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The mixed-precision dtype `autocast` uses: bfloat16 (or float16 where unsupported) on CUDA, else None."""
    if device.type != "cuda" or not enabled:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """Mixed precision on CUDA (bfloat16 where supported), a no-op context elsewhere."""
    dtype = autocast_dtype(device, enabled)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast("cuda", dtype=dtype)


def device_report(device: torch.device, amp: bool) -> dict[str, Any]:
    """What a run computes on, for its record: `train.device: auto` alone does not say.

    Keys: `device` (resolved, e.g. `cuda:0`, `cpu`), `dtype` (the weights' float32), `autocast`
    (the mixed-precision dtype, or `off`), `torch`, `cuda` (torch's CUDA build, or `none`),
    `gpu` (the device's name, or `none`), `cpu_threads` (torch's intra-op threads), `python`.
    """
    gpu = "none"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        device = torch.device("cuda", index)
        gpu = torch.cuda.get_device_name(index)
    dtype = autocast_dtype(device, amp)
    autocast_name = str(dtype).removeprefix("torch.") if dtype else "off"
    return {
        "device": str(device),
        "dtype": "float32",
        "autocast": autocast_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "gpu": gpu,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def describe_device(report: dict[str, Any]) -> str:
    """One line of a `device_report` for logs and stdout."""
    return (
        f"device {report['device']} ({report['gpu'] if report['gpu'] != 'none' else 'no GPU'}), "
        f"{report['dtype']} weights, autocast {report['autocast']}, torch {report['torch']}, "
        f"CUDA {report['cuda']}, {report['cpu_threads']} CPU threads"
    )
