"""The resumable training state: last model, optimiser, scheduler, position and history.

Written at the end of every epoch into `<out>/last/` (model as safetensors + JSON, optimiser
and scheduler as tensors-only torch files read with `weights_only=True`, the rest as JSON).
Writes go to a temporary folder that replaces the old one in two renames, so a kill at any
moment leaves either the previous or the new state, never a torn one. A `fingerprint` of the
configuration guards against resuming a run made with other params or data. Random state needs
no saving: training reseeds at the start of every epoch from the seed and the epoch number.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from l2rclip.config import ModelConfig
from l2rclip.models.checkpoint import WEIGHTS_FILE, save_model
from l2rclip.ranks import RankSpace

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class TrainState:
    """Where training stands; `epoch` counts finished epochs over all phases."""

    fingerprint: str
    epoch: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def save_state(folder: Path, model: torch.nn.Module, config: ModelConfig, rank_space: RankSpace,
               optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState,
               extra: dict[str, Any]) -> None:
    """Atomically replace `folder` with the current training state."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, config, rank_space, extra={**extra, "epoch": state.epoch})
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1, sort_keys=True), encoding="utf-8")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def find_state(folder: Path, fingerprint: str) -> TrainState | None:
    """The saved state if it exists and was made with the same fingerprint, else None."""
    old = folder.with_name(folder.name + ".old")
    if not folder.is_dir() and old.is_dir():  # killed between the two renames
        old.rename(folder)
    file = folder / STATE_FILE
    if not file.is_file():
        return None
    state = TrainState(**json.loads(file.read_text(encoding="utf-8")))
    if state.fingerprint != fingerprint:
        log.warning("found a training state in %s from other params or data; starting afresh", folder)
        return None
    return state


def restore(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
            scheduler: Any = None) -> None:
    """Load the saved model weights, and the optimiser and scheduler state when given (mid-phase)."""
    model.load_state_dict(load_file(folder / WEIGHTS_FILE, device=str(next(model.parameters()).device)))
    if optimizer is not None:
        blob = torch.load(folder / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
