"""Training loops and schedules (docs/method.md, section 4), with validation-based model selection.

- one-stage: prompts, RankFormer and (unless frozen) the image tower together, `ce + kl_t2i + cop`.
- two-stage: stage 1 freezes the image tower and trains prompts + RankFormer on cached image
  features with `supcon + cop_batch`; stage 2 freezes the prompts (prototypes computed once)
  and trains the image tower with `ce + kl_t2i + cop`.

Every epoch ends with validation on the split carved from train (never test), the best
checkpoint by `train.select_metric`, and the resumable state. Each epoch starts by reseeding from
(seed, epoch), so a run resumed after a kill finishes exactly as an uninterrupted one (on CPU).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from l2rclip.config import EvalConfig, LossConfig, ModelConfig, TrainConfig
from l2rclip.data.batch_transforms import crop_boxes, normalize, random_resized_crop, store_eval_batches
from l2rclip.data.dataset import RankImageDataset, make_loader
from l2rclip.data.store import ImageStore, StoreDataset, collate_batch
from l2rclip.evaluation.predictions import predict_outputs
from l2rclip.losses import OrdinalLoss
from l2rclip.methods import HEAD_KINDS, UNTRAINED
from l2rclip.metrics import HIGHER_IS_BETTER, ordinal_metrics, prefix_metrics
from l2rclip.models.checkpoint import save_model
from l2rclip.models.heads import HeadLoss, OrdinalHeadModel
from l2rclip.models.l2rclip import L2RCLIP
from l2rclip.progress import progress
from l2rclip.ranks import RankSpace
from l2rclip.runtime import autocast
from l2rclip.training.distributed import (
    SINGLE,
    GlobalBatchSampler,
    SeededSamples,
    World,
    gather_batch,
    rank_positions,
    wrap,
)
from l2rclip.training.features import cached_image_features, rows_of
from l2rclip.training.optim import build_optimizer, warmup_cosine
from l2rclip.training.resume import TrainState, restore, save_state

log = logging.getLogger(__name__)

IMAGE_TERMS = ("ce", "kl_t2i", "cop")
PROMPT_TERMS = ("supcon", "cop_batch")


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs with one set of trainable parts and loss terms."""

    name: str
    epochs: int
    terms: tuple[str, ...]
    train_image_tower: bool
    train_prompts: bool


def schedule_phases(train: TrainConfig, image_tower: str, method: str = "l2rclip") -> list[Phase]:
    """The phases of `train.schedule`; two-stage needs prompts and a trainable image tower."""
    if train.epochs < 1 or (train.schedule == "two_stage" and train.stage1_epochs < 0):
        raise ValueError(
            f"train.epochs: expected at least 1 (stage1_epochs >= 0), found epochs={train.epochs}, "
            f"stage1_epochs={train.stage1_epochs}"
        )
    if train.schedule == "one_stage":
        return [Phase("one_stage", train.epochs, IMAGE_TERMS, image_tower != "frozen", True)]
    if method in HEAD_KINDS:
        raise ValueError(
            f"train.schedule two_stage learns prompts in stage 1; model.method {method} has none: use one_stage"
        )
    if image_tower == "frozen":
        raise ValueError(
            "train.schedule two_stage trains the image tower in stage 2: "
            "expected model.image_tower: train, found frozen"
        )
    return [
        Phase("stage1", train.stage1_epochs, PROMPT_TERMS, False, True),
        Phase("stage2", train.epochs, IMAGE_TERMS, True, False),
    ]


@dataclass
class FoldData:
    """One fold's training inputs: every prepared image (for the feature cache), train and val rows."""

    images: pd.DataFrame
    train: pd.DataFrame
    val: pd.DataFrame
    root: Path
    store: ImageStore | None = None  # the preprocess stage's uint8 store; None: decode the files

    def fitting_splits(self) -> tuple[tuple[str, pd.DataFrame], ...]:
        """(name, rows) of the splits a method fits on: train, then val for model selection."""
        return (("train", self.train), ("val", self.val))


@dataclass
class TrainResult:
    """What `fit` leaves behind."""

    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict]
    seconds: float


def phase_loss(
    loss: LossConfig, rank_space: RankSpace, terms: tuple[str, ...], method: str = "l2rclip"
) -> OrdinalLoss | HeadLoss:
    """The loss of a phase: the configured weights of its terms, other terms switched off.

    Ordinal heads have their own loss (CE, CORAL or CORN) instead of the prompt losses.
    """
    if method in HEAD_KINDS:
        return HeadLoss(HEAD_KINDS[method], len(rank_space))
    weights = {name: (getattr(loss, name) if name in terms else 0.0) for name in IMAGE_TERMS + PROMPT_TERMS}
    if not any(weights.values()):
        raise ValueError(f"every loss term of this phase is 0: set one of loss.{', loss.'.join(terms)} > 0")
    return OrdinalLoss(rank_space.values, **{**dataclasses.asdict(loss), **weights})


def check_schedule(model_config: ModelConfig, train: TrainConfig, loss: LossConfig, rank_space: RankSpace) -> None:
    """Raise the errors `fit` would raise for a schedule or loss that cannot run, without training.

    A stage calls this before it touches its outputs, so bad settings never cost earlier results.
    """
    if model_config.method in UNTRAINED:
        return
    for phase in schedule_phases(train, model_config.image_tower, model_config.method):
        phase_loss(loss, rank_space, phase.terms, model_config.method)


def fit(
    model: L2RCLIP | OrdinalHeadModel,
    rank_space: RankSpace,
    data: FoldData,
    model_config: ModelConfig,
    train: TrainConfig,
    loss: LossConfig,
    eval_config: EvalConfig,
    transforms: tuple[Callable, Callable],
    out_dir: Path,
    seed: int,
    device: torch.device,
    state: TrainState,
    on_epoch: Callable[[dict, int], None] = lambda metrics, epoch: None,
    meta: dict | None = None,
    world: World = SINGLE,
) -> TrainResult:
    """Train with the configured schedule, writing `best/`, `last/` and resuming from `last/`.

    Args:
        model: the model, on `device`.
        rank_space: its ranks.
        data: the fold's images.
        model_config: the `model` section (saved with checkpoints).
        train: optimisation settings.
        loss: loss weights.
        eval_config: metric settings for validation.
        transforms: (training transform, evaluation transform).
        out_dir: where `best/`, `last/` and the feature cache pointer go.
        seed: the stage seed.
        device: where to train.
        state: where training stands: a fresh `TrainState` or the one `find_state` checked as
            the same computation (then finished epochs are skipped and the rest resumed).
        on_epoch: called with each epoch's metrics and `epoch_seconds` (for tracking; timings
            stay out of the history so that a rerun writes identical files).
        meta: extra JSON metadata saved with the checkpoints (backbone, is_clip...).
        world: this process among the data-parallel training processes (`l2rclip.training.distributed`):
            each trains its slice of every global batch of `train.batch_size`; rank 0 alone
            validates, writes `best/` and `last/`, and calls `on_epoch`.
    """
    start = time.perf_counter()
    meta = meta or {}
    last_dir, best_dir = out_dir / "last", out_dir / "best"
    if state.epoch:
        log.info("resuming from %s after epoch %d", last_dir, state.epoch)
    phases = schedule_phases(train, model_config.image_tower, model_config.method)
    features: dict[str, torch.Tensor] | None = None  # per split (N_split, E)
    if any(not p.train_image_tower for p in phases):
        if not world.is_main:
            world.barrier()  # rank 0 encodes and writes the cache first; the others read it
        encoded = cached_image_features(
            model,
            data.images,
            data.root,
            transforms[1],
            train.feature_cache,
            device,
            train.eval_batch_size,
            train.num_workers,
            train.amp,
            store=data.store,
        )
        if world.is_main:
            world.barrier()
        features = {split: rows_of(encoded, data.images, table) for split, table in data.fitting_splits()}
    first_epoch, restored, resumed_after = 0, False, state.epoch
    store_batches = (
        StoreBatches(data.train, data.store, train, seed, device, world) if data.store is not None else None
    )
    for phase in phases:
        end = first_epoch + phase.epochs
        if state.epoch >= end:
            first_epoch = end
            continue
        model.set_trainable(image_tower=phase.train_image_tower, prompts=phase.train_prompts)
        optimizer = build_optimizer(parameter_groups(model, train), train.optimizer)
        steps = -(-len(data.train) // train.batch_size)
        scheduler = warmup_cosine(optimizer, train.warmup_epochs * steps, phase.epochs * steps)
        if resumed_after and not restored:  # only a resumed run reads last/ (written by rank 0 alone)
            mid_phase = state.epoch > first_epoch
            restore(last_dir, model, optimizer if mid_phase else None, scheduler if mid_phase else None)
            restored = True
        criterion = phase_loss(loss, rank_space, phase.terms, model_config.method).to(device)
        fixed_text = (
            None if phase.train_prompts or not isinstance(model, L2RCLIP) else model.compute_prototypes().detach()
        )
        use_features = features is not None and not phase.train_image_tower
        network = wrap(model, device, world)
        # Image batches are split over the ranks and gathered for the loss; feature batches are whole.
        gather = (
            None
            if use_features or not world.distributed
            else (lambda outputs, labels: gather_batch(outputs, labels, world))
        )
        for epoch in range(state.epoch, end):
            torch.manual_seed(seed * 10_000 + epoch)
            if use_features and features is not None:
                batches = _feature_batches(features["train"], data.train, train.batch_size, seed * 10_000 + epoch)
            elif store_batches is not None:
                batches = store_batches.epoch(epoch)
            else:
                batches = _image_batches(data.train, data.root, transforms[0], train, seed * 10_000 + epoch, world)
            tick = time.perf_counter()
            terms = _train_epoch(
                network,
                criterion,
                optimizer,
                scheduler,
                batches,
                fixed_text,
                train,
                device,
                f"{phase.name} {epoch + 1}/{sum(p.epochs for p in phases)}",
                steps,
                gather,
                quiet=not world.is_main,
            )
            val = world.broadcast(
                validate(
                    model,
                    data,
                    features if use_features else None,
                    transforms[1],
                    train,
                    eval_config,
                    rank_space,
                    device,
                )
                if world.is_main
                else None
            )
            seconds = time.perf_counter() - tick
            record = {"epoch": epoch + 1, "phase": phase.name, **prefix_metrics(terms, "train"), **val}
            state.history.append(record)
            score = val.get(f"val/{train.select_metric}", -float(epoch))  # no val split: keep the last
            sign = 1.0 if train.select_metric in HIGHER_IS_BETTER or not val else -1.0
            better = state.best_score is None or sign * score > sign * state.best_score
            if better:
                state.best_score, state.best_epoch = float(score), epoch + 1
            state.epoch = epoch + 1
            if not world.is_main:
                continue
            if better:
                save_model(
                    model, best_dir, model_config, rank_space, extra={**meta, "epoch": epoch + 1, "val": val}
                )
            save_state(last_dir, model, model_config, rank_space, optimizer, scheduler, state, meta)
            on_epoch(
                {**{k: v for k, v in record.items() if k not in ("epoch", "phase")}, "epoch_seconds": seconds},
                epoch + 1,
            )
            log.info(
                "epoch %d/%d [%s] loss %.4f | %s | %.1f s, %.0f img/s",
                epoch + 1,
                sum(p.epochs for p in phases),
                phase.name,
                terms["loss"],
                ", ".join(f"{k} {v:.3f}" for k, v in val.items() if k in ("val/mae", "val/accuracy")),
                seconds,
                len(data.train) / seconds,
            )
        first_epoch = end
    best = next(r for r in state.history if r["epoch"] == state.best_epoch)
    return TrainResult(
        best_epoch=best["epoch"], best_metrics=best, history=state.history, seconds=time.perf_counter() - start
    )


def parameter_groups(model: L2RCLIP | OrdinalHeadModel, train: TrainConfig) -> list[dict]:
    """The optimiser groups of either model kind, with the learning rates of `train`."""
    if isinstance(model, OrdinalHeadModel):
        return model.param_groups(train.lr_head, train.lr_image, train.weight_decay)
    return model.param_groups(train.lr_prompt, train.lr_rankformer, train.lr_image, train.weight_decay)


class StoreBatches:
    """Training batches from the image store: one loader for all epochs, augmentation on `device`.

    The loader's workers only copy uint8 pixels (persistent on CUDA). Each epoch's global batches
    come from `GlobalBatchSampler` (seeded by (seed, epoch); under DDP this rank gets its slice)
    and the crop boxes of each whole global batch from a generator with the same seed, indexed with
    this rank's positions, so every image gets the crop one process would give it, whatever the
    number of processes or loader workers.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        store: ImageStore,
        train: TrainConfig,
        seed: int,
        device: torch.device,
        world: World = SINGLE,
    ):
        self.store, self.seed, self.device, self.world = store, seed, device, world
        self.sampler = GlobalBatchSampler(len(table), train.batch_size, seed, world)
        self.loader = make_loader(
            StoreDataset(table, store),
            train.batch_size,
            shuffle=True,
            num_workers=train.num_workers,
            device=device,
            batch_sampler=self.sampler,
            collate_fn=collate_batch,
            persistent=True,
        )

    def epoch(self, epoch: int) -> Iterator[tuple[dict, torch.Tensor]]:
        """The batches of `epoch`: normalised random crops (B, 3, H, W) on the device, and ranks (B,)."""
        epoch_seed = self.seed * 10_000 + epoch
        self.sampler.set_seed(epoch_seed)
        generator = torch.Generator().manual_seed(epoch_seed)
        spec = self.store.spec
        for size, (images, labels) in zip(self.sampler.global_sizes(), self.loader, strict=True):
            boxes = crop_boxes(size, spec.side, generator)[rank_positions(size, self.world)[0]]  # (B/N, 4)
            images = images.to(self.device, non_blocking=True)  # uint8 (B/N, 3, S, S)
            crops = random_resized_crop(images, spec.image_size, boxes)  # (B/N, 3, H, W), 0..255
            yield {"images": normalize(crops, spec)}, labels


def _image_batches(
    table: pd.DataFrame, root: Path, transform: Callable, train: TrainConfig, seed: int, world: World = SINGLE
) -> Iterator[tuple[dict, torch.Tensor]]:
    # This rank's slice of each seeded global batch; augmentation seeded per image (l2rclip.training.distributed).
    loader = make_loader(
        SeededSamples(RankImageDataset(table, root, transform), seed),
        train.batch_size,
        shuffle=True,
        num_workers=train.num_workers,
        seed=seed,
        batch_sampler=GlobalBatchSampler(len(table), train.batch_size, seed, world),
    )
    for images, labels in loader:
        yield {"images": images}, labels


def _feature_batches(
    features: torch.Tensor, table: pd.DataFrame, batch_size: int, seed: int
) -> Iterator[tuple[dict, torch.Tensor]]:
    labels = torch.tensor(table["rank"].to_numpy(dtype=np.int64))  # (N,); a copy: pandas arrays are read-only
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    for chunk in order.split(batch_size):
        yield {"image_features": features[chunk]}, labels[chunk]


def optimisation_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float | None) -> None:
    """Backward, optional gradient-norm clipping over the optimised parameters, and the update."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()


def _train_epoch(
    model: torch.nn.Module,
    criterion: OrdinalLoss | HeadLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]],
    fixed_text: torch.Tensor | None,
    train: TrainConfig,
    device: torch.device,
    description: str,
    total: int,
    gather: Callable | None = None,
    quiet: bool = False,
) -> dict[str, float]:
    """One pass over the training batches; returns the mean of every loss term.

    `gather` turns this rank's outputs and labels into the global batch's (data-parallel image
    batches, `l2rclip.training.distributed.gather_batch`); `quiet` hides the progress bar (ranks > 0).
    """
    model.train()
    sums: dict[str, float] = {}
    count = 0
    # A bar on a terminal; elsewhere log lines with an ETA every 30 s (l2rclip.progress).
    bar = progress(batches, description, total, "batch", log, quiet=quiet)
    for inputs, labels in bar:
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        labels = labels.to(device)
        with autocast(device, train.amp):
            outputs = model(**inputs, text_features=fixed_text)
            if gather is not None:
                outputs, labels = gather(outputs, labels)
            terms = criterion(outputs, labels)
        optimisation_step(optimizer, terms["loss"], train.grad_clip)
        scheduler.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach()) * len(labels)
        count += len(labels)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{float(terms['loss'].detach()):.4f}")
    return {name: total / max(count, 1) for name, total in sums.items()}


def validate(
    model: L2RCLIP | OrdinalHeadModel,
    data: FoldData,
    features: dict | None,
    transform: Callable,
    train: TrainConfig,
    eval_config: EvalConfig,
    rank_space: RankSpace,
    device: torch.device,
) -> dict[str, float]:
    """`val/...` metrics on the validation split (empty dict when there is none)."""
    if data.val.empty:
        return {}
    if features is not None:
        batches = ({"image_features": chunk} for chunk in features["val"].split(train.eval_batch_size))
    elif data.store is not None:
        batches = (
            {"images": images}
            for images in store_eval_batches(
                data.val, data.store, train.eval_batch_size, train.num_workers, device
            )
        )
    else:
        loader = make_loader(
            RankImageDataset(data.val, data.root, transform),
            train.eval_batch_size,
            shuffle=False,
            num_workers=train.num_workers,
        )
        batches = ({"images": images} for images, _ in loader)
    probs, point = predict_outputs(model, batches, device, train.amp)
    metrics = ordinal_metrics(
        probs,
        data.val["rank"].to_numpy(),
        rank_space.value_array,
        eval_config.cs_theta,
        eval_config.ece_bins,
        point,
    )
    return prefix_metrics(metrics, "val")
