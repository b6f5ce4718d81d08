"""Torch datasets over a split table, and deterministic data loaders.

The dataset reads images with the same `load_rgb` that validation used, so what was checked is
exactly what trains. The transform is the caller's: training augmentation or the evaluation
resize + centre crop are choices of the training code, not of the data.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from l2rclip.data.validate import load_rgb


class RankImageDataset(Dataset):
    """Images of a split table with their rank indices.

    Args:
        table: rows with `path` (relative to `root`, or absolute) and `rank` (index 0..M-1),
            e.g. `l2rclip.data.splits.select(splits, fold, "train")`.
        root: the folder relative paths start from.
        transform: PIL RGB image -> tensor, e.g. an open_clip preprocess.
    """

    def __init__(self, table: pd.DataFrame, root: str | Path, transform: Callable[[Image.Image], torch.Tensor]):
        root = Path(root)
        self.paths = [root / path for path in table["path"]]
        self.ranks = table["rank"].to_numpy(dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_rgb(self.paths[index])), int(self.ranks[index])


def seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` in a loader worker from torch's per-worker seed.

    Torch seeds each worker from the loader's generator, but not numpy or `random`; without
    this, augmentations drawing from them would differ run to run (or repeat across workers).
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def resolve_workers(num_workers: int | str) -> int:
    """`auto`: half the CPUs (at most 8), leaving the rest to the training process; else the number."""
    if num_workers == "auto":
        return min(8, (os.cpu_count() or 2) // 2)
    return int(num_workers)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int | str = 0,
    seed: int = 0,
    drop_last: bool = False,
    device: torch.device | str | None = None,
    batch_sampler: Sampler | None = None,
    collate_fn: Callable | None = None,
    persistent: bool = False,
) -> DataLoader:
    """Build a DataLoader whose order and worker randomness follow `seed` alone.

    Args:
        dataset: e.g. a `RankImageDataset` or a `StoreDataset`.
        batch_size: images per batch.
        shuffle: reshuffle every epoch (training) or keep the table order (evaluation).
        num_workers: loader processes, or `auto` (`resolve_workers`); 0 loads in the main process,
            where transforms draw from the main process's generators, which the stage seeds once.
        seed: seeds the shuffling generator and, through it, every worker's torch, numpy and
            `random` generators.
        drop_last: drop a final incomplete batch.
        device: where the batches go; on CUDA batches are pinned (for non-blocking copies).
        batch_sampler: yields the batches' keys instead (then batch_size, shuffle and drop_last
            are its business), e.g. `l2rclip.training.distributed.GlobalBatchSampler`.
        collate_fn: how items become a batch (default: torch's).
        persistent: keep the workers across epochs on CUDA (for a loader that serves every epoch,
            whose batch sampler is reseeded per epoch in this process).
    """
    workers = resolve_workers(num_workers)
    cuda = device is not None and torch.device(device).type == "cuda"
    generator = torch.Generator().manual_seed(seed)
    options: dict[str, Any] = {
        "num_workers": workers,
        "worker_init_fn": seed_worker,
        "generator": generator,
        "pin_memory": cuda,
        "collate_fn": collate_fn,
        "persistent_workers": persistent and cuda and workers > 0,
    }
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **options)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, **options)
