"""Two-stage stage 1 (frozen image tower, cached features) against a one-stage epoch, side by side.

Both variants run `l2rclip.training.loop.fit` on the same demo images, from the same initial weights:

- stage 1:   `train.schedule: two_stage` with `train.epochs: 0` (stage 1 only): the image tower is
             frozen, every image is encoded once by `l2rclip.training.features.cached_image_features`, and
             epochs train prompts + RankFormer on the cached features (`supcon + cop_batch`);
- one-stage: `train.schedule: one_stage`, `model.image_tower: train`: every step sends the images
             (training augmentation) through the trainable image tower (`ce + kl_t2i + cop`).

The one-time feature-caching cost is timed on its own (into a fresh cache folder every repeat, so
it really encodes); `fit` then finds the features in the run's cache, as every fold after the
first does in the pipeline. Epoch time is fit's `epoch_seconds` (training pass + validation,
without checkpoint writing); fit time is the whole call (checkpoints included). Variants are
alternated within one run so that machine noise hits both. Weights do not change the cost, so the
backbone is randomly initialised (no download).

    python benchmarks/stage1_epoch.py                                 # L2RCLIP-Tiny, 600 images (the demo's size)
    python benchmarks/stage1_epoch.py --arch ViT-B-16 --images 40     # the paper's backbone (slow on CPU)
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from benchmark_utils import machine_line

from l2rclip.config import Params, from_dict
from l2rclip.data.demo import generate_demo
from l2rclip.models.backbone import load_backbone
from l2rclip.models.factory import build_l2rclip
from l2rclip.ranks import RankSpace
from l2rclip.training.features import cached_image_features
from l2rclip.training.loop import FoldData, fit
from l2rclip.training.resume import TrainState


def make_params(args: argparse.Namespace, variant: str, cache: Path) -> Params:
    train = {
        "epochs": args.epochs,
        "batch_size": args.batch,
        "device": "cpu",
        "num_workers": 0,
        "feature_cache": str(cache),
        "warmup_epochs": 0,
    }
    if variant == "stage1":
        train.update(schedule="two_stage", stage1_epochs=args.epochs, epochs=0)
    return from_dict(
        Params,
        {
            "model": {
                "arch": args.arch,
                "pretrained": "none",
                "image_tower": "train",
                "prompt": {"context_init": "random", "n_context": args.context},
            },
            "loss": {"ce": 1.0, "kl_t2i": 1.0, "cop": 1.0, "cop_batch": 1.0, "supcon": 1.0},
            "train": train,
            "tracking": {"enabled": False},
        },
    )


def demo_fold(root: Path, n_images: int, image_size: int, val_fraction: float) -> FoldData:
    """The demo set, with the last groups (pseudo-subjects) held out for validation."""
    n_per_rank = max(1, math.ceil(n_images / 10))
    table = generate_demo(root, n_per_rank=n_per_rank, image_size=image_size)
    table["rank"] = RankSpace(range(1, 11)).indices(table["label"])
    groups = sorted(table["group"].unique())
    n_val = math.ceil(val_fraction * len(groups)) if val_fraction > 0 and len(groups) > 1 else 0
    is_val = table["group"].isin(groups[len(groups) - n_val :])
    return FoldData(
        images=table,
        train=table[~is_val].reset_index(drop=True),
        val=table[is_val].reset_index(drop=True),
        root=root,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="L2RCLIP-Tiny", help="open_clip architecture (default L2RCLIP-Tiny)")
    parser.add_argument("--images", type=int, default=600, help="demo images in all, 10 ranks (default 600)")
    parser.add_argument("--image-size", type=int, default=96, help="side of the demo images (default 96)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of groups for validation")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per fit (default 2)")
    parser.add_argument("--batch", type=int, default=32, help="training batch size (default 32)")
    parser.add_argument("--context", type=int, default=8, help="context tokens N (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="fits per variant (default 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="l2rclip-stage1-") as tmp:
        tmp = Path(tmp)
        data = demo_fold(tmp / "demo", args.images, args.image_size, args.val_fraction)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backbone = load_backbone(args.arch, "none")
        rank_space = RankSpace(range(1, 11))
        params = {v: make_params(args, v, tmp / "cache") for v in ("stage1", "one_stage")}
        model = build_l2rclip(backbone, rank_space, params["one_stage"].model)
        initial = copy.deepcopy(model.state_dict())
        transforms = (backbone.preprocess_train, backbone.preprocess_eval)
        device = torch.device("cpu")

        cache_s: list[float] = []
        epochs: dict[str, list[float]] = {"stage1": [], "one_stage": []}
        fits: dict[str, list[float]] = {"stage1": [], "one_stage": []}

        def cache(repeat: int) -> None:
            model.load_state_dict(initial)
            tick = time.perf_counter()
            cached_image_features(
                model,
                data.images,
                data.root,
                transforms[1],
                tmp / f"cache-timed-{repeat}",
                device,
                params["stage1"].train.eval_batch_size,
            )
            cache_s.append(time.perf_counter() - tick)

        def run(variant: str, repeat: int) -> None:
            p = params[variant]
            model.load_state_dict(initial)
            tick = time.perf_counter()
            seconds: list[float] = []
            fit(
                model,
                rank_space,
                data,
                p.model,
                p.train,
                p.loss,
                p.eval,
                transforms,
                tmp / "runs" / f"{variant}-{repeat}",
                p.seed,
                device,
                TrainState(f"bench-{variant}-{repeat}"),
                on_epoch=lambda metrics, epoch: seconds.append(metrics["epoch_seconds"]),
            )
            fits[variant].append(time.perf_counter() - tick)
            epochs[variant] += seconds

        # The run's shared cache, filled once up front (untimed), as the first fold of a pipeline does.
        cached_image_features(
            model,
            data.images,
            data.root,
            transforms[1],
            tmp / "cache",
            device,
            params["stage1"].train.eval_batch_size,
        )
        for repeat in range(args.repeats):
            steps = [
                lambda r=repeat: cache(r),
                lambda r=repeat: run("stage1", r),
                lambda r=repeat: run("one_stage", r),
            ]
            for step in steps if repeat % 2 == 0 else reversed(steps):  # alternate the order
                step()

    stage1, one = statistics.median(epochs["stage1"]), statistics.median(epochs["one_stage"])
    caching = statistics.median(cache_s)
    print(
        f"# {args.arch}, demo set: {len(data.images)} images ({len(data.train)} train, {len(data.val)} val), "
        f"{args.image_size} px -> {backbone.model.visual.image_size[0]} px, batch {args.batch}, "
        f"{args.epochs} epoch(s) per fit"
    )
    print(
        f"# {machine_line()}; median over {args.repeats} alternated fits per variant; "
        f"{time.perf_counter() - start:.0f} s in all"
    )
    print("| variant | epoch (s) | epoch speed-up | fit (s) | one-time feature caching (s) |")
    print("|---|---|---|---|---|")
    print(
        f"| one-stage (image tower trained, images every step) | {one:.2f} | 1.00x "
        f"| {statistics.median(fits['one_stage']):.1f} | - |"
    )
    print(
        f"| two-stage stage 1 (tower frozen, cached features) | {stage1:.3f} | {one / stage1:.1f}x "
        f"| {statistics.median(fits['stage1']):.1f} | {caching:.2f} ({len(data.images)} images) |"
    )
    print(
        f"caching costs {caching / one:.2f} one-stage epochs; stage 1 with caching breaks even after "
        f"{caching / max(one - stage1, 1e-9):.2f} epochs"
    )


if __name__ == "__main__":
    main()
