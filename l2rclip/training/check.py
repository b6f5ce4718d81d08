"""The library check: the method end to end on a few real images, in well under a minute.

It loads params.yaml, the configured CLIP backbone (or, when its weights cannot be had, a small
randomly initialised one, said plainly), builds L2RCLIP, takes a batch of the embedded demo set
through the real preprocessing (an image store written as the preprocess stage writes it, and the
training crops drawn from it), runs a few optimisation steps with every configured loss term,
and evaluates the batch with the cached prototypes. It verifies what must hold after training
steps (finite losses, an untouched text tower, the truncated prototypes equal to the full-length
ones) and raises if anything does not.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from l2rclip.config import Params
from l2rclip.data.batch_transforms import crop_boxes, normalize, random_resized_crop
from l2rclip.data.sources import load_source
from l2rclip.data.store import ImageStore, spec_for, write_store
from l2rclip.metrics import ordinal_metrics, prototype_ordinality
from l2rclip.models.factory import build_l2rclip, resolve_backbone
from l2rclip.models.kinds import BackboneKind
from l2rclip.ranks import RankSpace
from l2rclip.training.loop import IMAGE_TERMS, phase_loss

log = logging.getLogger(__name__)


@dataclass
class CheckResult:
    """What the check measured."""

    arch: str
    is_clip: bool
    kind: BackboneKind  # clip | demo | random
    losses: list[dict[str, float]]
    metrics: dict[str, float]
    ordinality: float
    truncation_error: float
    seconds: float


def run_check(params: Params, steps: int = 3, per_rank: int = 3) -> CheckResult:
    """Run the check (see the module docstring); raises AssertionError when something is wrong."""
    start = time.perf_counter()
    torch.manual_seed(params.seed)
    backbone, model_config = resolve_backbone(params.model)
    params = dataclasses.replace(params, model=model_config)
    space = RankSpace.from_config(params.ranks)
    model = build_l2rclip(backbone, space, params.model)

    demo = params.data.demo
    root = Path(params.data.root)
    table = load_source("demo", root, n_per_rank=demo.n_per_rank, image_size=demo.image_size, seed=params.seed)
    table = table.assign(rank=space.indices(table["label"]))
    batch = table.groupby("rank", sort=True).head(per_rank)
    with tempfile.TemporaryDirectory() as folder:
        spec = spec_for(backbone.recipe, params.preprocess.margin)
        write_store(list(batch["path"]), root, spec, Path(folder))
        store = ImageStore(folder)
        pixels = store.gather(store.rows(list(batch["path"])))  # uint8 (B, 3, S, S)
    boxes = crop_boxes(len(pixels), store.spec.side, torch.Generator().manual_seed(params.seed))
    crops = random_resized_crop(pixels, store.spec.image_size, boxes)
    images = normalize(crops, store.spec)  # (B, 3, H, W)
    labels = torch.tensor(batch["rank"].to_numpy())  # (B,)

    frozen = {name: p.detach().clone() for name, p in model.text_encoder.named_parameters()}
    criterion = phase_loss(params.loss, space, IMAGE_TERMS)  # the one-stage loss
    optimizer = torch.optim.Adam(
        model.param_groups(params.train.lr_prompt, params.train.lr_rankformer, params.train.lr_image)
    )
    losses = []
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        terms = criterion(model(images), labels)
        terms["loss"].backward()
        optimizer.step()
        losses.append({k: float(v.detach()) for k, v in terms.items()})
        log.info("step %d: %s", step + 1, ", ".join(f"{k} {v:.4f}" for k, v in losses[-1].items()))
        assert np.isfinite(losses[-1]["loss"]), f"loss is not finite at step {step + 1}: {losses[-1]}"
    for name, param in model.text_encoder.named_parameters():
        assert torch.equal(param, frozen[name]), f"text tower parameter {name} changed during training"

    model.eval()
    with torch.no_grad():
        block = model.prompt_block()
        error = (model.text_encoder(block) - model.text_encoder(block, truncate=False)).abs().max().item()
        assert error < 1e-4, f"truncated prototypes differ from full-length ones by {error:.2e}"
        prototypes = model.cache_prototypes()
        probs = model(images)["logits"].softmax(dim=1).numpy()
    metrics = ordinal_metrics(probs, labels.numpy(), space.value_array, params.eval.cs_theta, params.eval.ece_bins)
    return CheckResult(
        arch=params.model.arch,
        is_clip=backbone.is_clip,
        kind=backbone.kind,
        losses=losses,
        metrics=metrics,
        ordinality=prototype_ordinality(prototypes.numpy()),
        truncation_error=error,
        seconds=time.perf_counter() - start,
    )
