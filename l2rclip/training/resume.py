"""The resumable training state: last model, optimiser, scheduler, position and history.

Written at the end of every epoch into `<out>/last/` (model as safetensors + JSON, optimiser
and scheduler as tensors-only torch files read with `weights_only=True`, the rest as JSON).
Writes go to a temporary folder that replaces the old one in two renames, so a kill at any
moment leaves either the previous or the new state, never a torn one. Random state needs no
saving: training reseeds at the start of every epoch from the seed and the epoch number.

Resuming must only ever continue the *same* computation. The state records the run's identity
(`run_identity`: the params, fold, data version, a hash of each l2rclip source file in the
stage's import closure, which dvc.yaml lists as its code deps, and the versions of the libraries
that compute); a saved state with another identity is not resumed, and the log says in one line what
differed. So `dvc repro` after a code edit retrains from scratch instead of "resuming" a finished
run, and an unchanged rerun still skips or continues as before.

A state that cannot be read back (bad JSON, truncated weights, a missing optimiser file) is moved
aside (outside the stage's output folder, `<parent>-last.corrupt-<UTC time>`) with a warning, so
it blocks nothing and loses nothing.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import pickle
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from l2rclip.config import ModelConfig
from l2rclip.models.checkpoint import WEIGHTS_FILE, save_model
from l2rclip.models.heads import OrdinalHeadModel
from l2rclip.models.l2rclip import L2RCLIP
from l2rclip.ranks import RankSpace
from l2rclip.training.code_deps import code_hashes

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
# What reading a damaged state raises (json, safetensors, torch.load's zip and unpickler).
UNREADABLE = (
    OSError,
    ValueError,
    TypeError,
    KeyError,
    RuntimeError,
    EOFError,
    pickle.UnpicklingError,
    SafetensorError,
)
# Libraries whose version can change the numbers a training step computes.
COMPUTING_LIBRARIES = (
    "torch",
    "open_clip_torch",
    "numpy",
    "safetensors",
    "pillow",
    "coral-pytorch",
    "scikit-learn",
)


def library_versions() -> dict[str, str]:
    """The installed versions of `COMPUTING_LIBRARIES` and Python (absent ones as "none")."""
    versions = {"python": platform.python_version()}
    for name in COMPUTING_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "none"
    return versions


def run_identity(
    params: dict[str, Any], fold: int, data_version: str, stage: str = "l2rclip.stages.train"
) -> dict[str, Any]:
    """What makes two training runs the same computation: params, fold, data, code, libraries.

    The code is the import closure of the `stage` module (`l2rclip.training.code_deps`), which is what
    dvc.yaml lists as the stage's code deps.
    """
    return {
        "params": params,
        "fold": fold,
        "data": data_version,
        "code": code_hashes(stage),
        "libraries": library_versions(),
    }


def identity_fingerprint(identity: dict[str, Any]) -> str:
    """A short hash of a run identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity_difference(saved: dict[str, Any] | None, current: dict[str, Any]) -> str:
    """One phrase saying what differs between two run identities (for the "starting fresh" line)."""
    if not saved:
        return "the state records no run identity (written by an older l2rclip)"
    # The saved identity went through JSON (tuples became lists), as the fingerprint does: compare
    # like with like, or every list-valued param (folds, model.probe_c, conformal.alpha) "differs".
    current = _as_json(current)
    parts = []
    if saved.get("params") != current["params"]:
        keys = sorted(
            k
            for k in set(saved.get("params", {})) | set(current["params"])
            if saved.get("params", {}).get(k) != current["params"].get(k)
        )
        parts.append("params " + ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else ""))
    if saved.get("fold") != current["fold"]:
        parts.append(f"fold {saved.get('fold')} -> {current['fold']}")
    if saved.get("data") != current["data"]:
        parts.append(f"data version {saved.get('data')} -> {current['data']}")
    old_code, new_code = saved.get("code", {}), current["code"]
    changed = sorted(f for f in set(old_code) | set(new_code) if old_code.get(f) != new_code.get(f))
    if changed:
        parts.append("code " + ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
    old_libs, new_libs = saved.get("libraries", {}), current["libraries"]
    libs = [
        f"{k} {old_libs.get(k)} -> {new_libs.get(k)}"
        for k in sorted(set(old_libs) | set(new_libs))
        if old_libs.get(k) != new_libs.get(k)
    ]
    if libs:
        parts.append("libraries " + ", ".join(libs))
    return "; ".join(parts) or "nothing visible (fingerprint scheme changed)"


def _as_json(value: Any) -> Any:
    """`value` as it reads back from the state file (tuples as lists, other objects as strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@dataclass
class TrainState:
    """Where training stands; `epoch` counts finished epochs over all phases."""

    fingerprint: str
    identity: dict[str, Any] | None = None
    epoch: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def save_state(
    folder: Path,
    model: L2RCLIP | OrdinalHeadModel,
    config: ModelConfig,
    rank_space: RankSpace,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    extra: dict[str, Any],
) -> None:
    """Atomically replace `folder` with the current training state."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, config, rank_space, extra={**extra, "epoch": state.epoch})
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1, sort_keys=True), encoding="utf-8")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def find_state(folder: Path, identity: dict[str, Any], aside: Path | None = None) -> TrainState | None:
    """The saved state if it exists, is readable and was made by the same computation, else None.

    An unreadable state is moved into the folder `aside` (default: beside `folder`; pass one
    outside an output folder the caller is about to clear); one from another computation is left
    for the caller to clear. Either way the log says why training starts afresh, in one line.
    """
    old = folder.with_name(folder.name + ".old")
    if not folder.is_dir() and old.is_dir():  # killed between the two renames
        old.rename(folder)
    if not folder.is_dir():
        return None
    try:
        state = _read_state(folder)
    except UNREADABLE as error:
        moved = quarantine(folder, aside or folder.parent)
        log.warning(
            "the training state in %s cannot be read (%s); moved it to %s and starting afresh",
            folder,
            error,
            moved,
        )
        return None
    if state.fingerprint != identity_fingerprint(identity):
        log.warning(
            "starting afresh: the training state in %s is from another computation (%s differ)",
            folder,
            identity_difference(state.identity, identity),
        )
        return None
    return state


def _read_state(folder: Path) -> TrainState:
    """Parse and check every file of a saved state; raises on anything that could not be restored."""
    file = folder / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing")
    state = TrainState(**json.loads(file.read_text(encoding="utf-8")))
    if not isinstance(state.epoch, int) or state.epoch < 0 or not isinstance(state.history, list):
        raise ValueError(f"{file}: expected a non-negative epoch and a history list")
    with safe_open(folder / WEIGHTS_FILE, framework="pt") as weights:  # header and sizes checked
        for key in weights.keys():  # noqa: SIM118 (safe_open is not iterable)
            weights.get_slice(key)
    torch.load(folder / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
    return state


def quarantine(folder: Path, into: Path) -> Path:
    """Move `folder` to `<into>/<parent>-<name>.corrupt-<UTC time>` and return the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = into / f"{folder.parent.name}-{folder.name}.corrupt-{stamp}"
    into.mkdir(parents=True, exist_ok=True)
    shutil.move(folder, moved)
    return moved


def restore(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None
) -> None:
    """Load the saved model weights, and the optimiser and scheduler state when given (mid-phase)."""
    model.load_state_dict(load_file(folder / WEIGHTS_FILE, device=str(next(model.parameters()).device)))
    if optimizer is not None:
        blob = torch.load(folder / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
