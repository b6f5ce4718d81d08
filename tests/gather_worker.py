"""A 2-process gloo worker for tests/test_distributed.py, light to import (spawned processes import it)."""

from pathlib import Path

import torch
from torch import nn

from l2rclip.losses import OrdinalLoss
from l2rclip.training.distributed import PADDING_LABEL, World, gather_batch, rank_positions

TERMS = {"ce": 1.0, "kl_t2i": 1.0, "cop": 1.0, "cop_batch": 1.0, "supcon": 1.0}  # every whole-batch term
STEPS = (slice(0, 12), slice(0, 5), slice(5, 6))  # global batches: even, uneven, one image for two ranks


def fixed_batch():
    """12 inputs (12, 6) and their rank labels (12,), fixed."""
    return torch.randn(12, 6, generator=torch.Generator().manual_seed(1)), torch.tensor(
        [0, 1, 4, 2, 2, 3, 0, 4, 1, 1, 3, 2]
    )


class TinyRanker(nn.Module):
    """An image tower (linear) and learnable prototypes: the shape of L2RCLIP's computation."""

    def __init__(self):
        super().__init__()
        self.tower = nn.Linear(6, 4)
        self.prompts = nn.Parameter(torch.randn(5, 4))

    def forward(self, images):
        v = nn.functional.normalize(self.tower(images), dim=-1)  # (B, E)
        t = nn.functional.normalize(self.prompts, dim=-1)  # (M, E)
        return {"logits": 10.0 * v @ t.T, "image_features": v, "text_features": t}


def run(rank, size, init_file, out_dir):
    """Per step: this rank's slice through DDP, the gathered loss, then the averaged gradients."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(TinyRanker())
    criterion = OrdinalLoss(torch.arange(5.0).tolist(), **TERMS)
    images, labels = fixed_batch()
    out = []
    for batch in STEPS:
        positions, real = rank_positions(batch.stop - batch.start, World(rank, size))
        rows = positions + batch.start  # (width,), padded as GlobalBatchSampler pads
        mine = torch.where(real, labels[rows], PADDING_LABEL)
        model.zero_grad()
        outputs, every = gather_batch(model(images[rows]), mine, World(rank, size))
        loss = criterion(outputs, every)["loss"]
        loss.backward()
        out.append((loss.item(), {k: p.grad.clone() for k, p in model.module.named_parameters()}))
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
