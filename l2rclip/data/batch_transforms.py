"""Per-batch transforms of uint8 store batches, on the training device.

The store holds uint8 pixels (`l2rclip.data.store`); these functions turn a batch of them into the
model's input where the model runs: on a GPU the work is a few kernels per batch instead of a
CPU pipeline per image. Training crops are drawn from a seeded generator on the CPU, so the same
seed gives the same crops on any device and with any number of loader workers.

- `random_resized_crop`: open_clip's training augmentation (RandomResizedCrop, scale 0.9..1 of the
  area, aspect ratio 3/4..4/3), one box per image, resampled in one batched `grid_sample` call
  (bilinear; the PIL path is bicubic: the augmentation is the same in distribution, not in pixels).
- `resize_to_input`: evaluation; the identity when the store's side is the input size (then the
  result equals ToTensor + Normalize of the files' evaluation transform exactly).
- `normalize`: /255, then the backbone's mean and std.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pandas as pd
import torch
import torch.nn.functional as F

from l2rclip.data.dataset import make_loader
from l2rclip.data.store import ImageStore, StoreDataset, StoreSpec, collate_batch


def normalize(images: torch.Tensor, spec: StoreSpec) -> torch.Tensor:
    """uint8 or float (B, 3, H, W) in 0..255 -> float (B, 3, H, W) normalised as open_clip does."""
    images = images.float().div_(255.0) if images.dtype == torch.uint8 else images / 255.0
    mean = torch.tensor(spec.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def crop_boxes(
    n: int,
    side: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """(n, 4) boxes x1, y1, x2, y2 in pixels: random area share `scale` and aspect ratio `ratio`."""
    area = torch.empty(n).uniform_(*scale, generator=generator) * side * side
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    width = (area * aspect).sqrt().clamp(max=side)
    height = (area / aspect).sqrt().clamp(max=side)
    x1 = torch.rand(n, generator=generator) * (side - width)
    y1 = torch.rand(n, generator=generator) * (side - height)
    return torch.stack([x1, y1, x1 + width, y1 + height], dim=1)


def random_resized_crop(images: torch.Tensor, size: int, boxes: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float (B, 3, size, size) in 0..255: image i cropped to `boxes[i]`.

    `boxes` (B, 4) comes from `crop_boxes`; each becomes an affine map from the output grid
    ([-1, 1] at pixel edges) onto the box, and one `grid_sample` call resamples the batch.
    """
    n, side = len(images), images.shape[-1]
    x1, y1, x2, y2 = boxes.to(images.device).unbind(1)  # (B,) each
    theta = torch.zeros(n, 2, 3, device=images.device)  # (B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = (x2 - x1) / side, (x1 + x2) / side - 1
    theta[:, 1, 1], theta[:, 1, 2] = (y2 - y1) / side, (y1 + y2) / side - 1
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_to_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> (B, 3, size, size): unchanged when S == size, else bicubic + antialias."""
    if images.shape[-1] == size:
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp_(0, 255).round_()  # as PIL would store it


def store_eval_batches(
    table: pd.DataFrame, store: ImageStore, batch_size: int, num_workers: int | str, device: torch.device
) -> Iterator[torch.Tensor]:
    """Evaluation inputs from the store, in table order: normalised (B, 3, H, W) on `device`."""
    loader = make_loader(
        StoreDataset(table, store),
        batch_size,
        shuffle=False,
        num_workers=num_workers,
        device=device,
        collate_fn=collate_batch,
    )
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        yield normalize(resize_to_input(images, store.spec.image_size), store.spec)
