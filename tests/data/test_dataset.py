"""Dataset and loaders: images come back as the transform makes them, in a seed-fixed order."""

import random

import numpy as np
import pandas as pd
import torch
from PIL import Image

from l2rclip.data.dataset import RankImageDataset, make_loader


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255  # (3, H, W)


def noisy(image: Image.Image) -> torch.Tensor:
    """An 'augmentation' drawing from numpy and random, as real ones do."""
    return to_tensor(image) + float(np.random.rand()) + random.random()


def write_table(folder, n: int = 12) -> pd.DataFrame:
    for i in range(n):
        Image.new("L" if i % 2 else "RGB", (8, 6), i * 10).save(folder / f"{i}.png")
    return pd.DataFrame({"path": [f"{i}.png" for i in range(n)], "rank": [i % 3 for i in range(n)]})


def test_items_are_rgb_tensors_with_rank_indices(tmp_path):
    dataset = RankImageDataset(write_table(tmp_path), tmp_path, to_tensor)
    image, rank = dataset[5]
    assert len(dataset) == 12 and rank == 2
    assert image.shape == (3, 6, 8)
    assert torch.allclose(image, torch.full_like(image, 50 / 255))  # greyscale spread over RGB


def test_loader_order_and_worker_randomness_follow_the_seed(tmp_path):
    table = write_table(tmp_path)

    def epoch(transform, seed: int, workers: int) -> list[torch.Tensor]:
        np.random.seed(seed + 1000 * len(draws))  # the parent's state differs on every call...
        draws.append(seed)
        loader = make_loader(
            RankImageDataset(table, tmp_path, transform),
            batch_size=4,
            shuffle=True,
            num_workers=workers,
            seed=seed,
        )
        return [torch.cat([images.flatten(1)[:, 0], ranks.float()]) for images, ranks in loader]

    draws: list[int] = []
    for transform, workers in ((to_tensor, 0), (noisy, 2)):  # ...so only `seed` may matter
        first, again = epoch(transform, 0, workers), epoch(transform, 0, workers)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        assert not all(torch.equal(a, b) for a, b in zip(first, epoch(transform, 1, workers), strict=True))
