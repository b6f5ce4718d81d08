"""Data path: the preprocess stage's uint8 store against decoding the JPEG files, side by side.

Two measurements on FG-NET (1,002 JPEGs of varied size, 175 greyscale), in one process, the
variants alternating so that machine noise hits both alike:

1. Loader throughput at 224 px (ViT-B-16 geometry), training mode, one loader worker each: what
   the loader hands the training device per second. From the files, the worker decodes and runs
   open_clip's training transform (RandomResizedCrop, ToTensor, Normalize); from the store, it
   copies uint8 batches, and the crops and normalisation run on the device (`StoreBatches`).
   Target: at least 10x. A third row runs those device-side crops on this CPU as well, which is
   what CPU-only training pays.
2. One training epoch of L2RCLIP-Tiny (64 px) through `l2rclip.training.fit_method`, same settings,
   from the files against from the store (`FoldData.store`). Target: at least 3x.

The store is built once beforehand (timed separately: that is the preprocess stage's one-off cost).
The backbone is random (`pretrained: none`): cost does not depend on weights; nothing here is an
accuracy result.

    python benchmarks/data_path.py                         # ../shared/data/fgnet, 3 repeats
    python benchmarks/data_path.py --fgnet /data/fgnet --repeats 5 --workers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import open_clip
import pandas as pd
import torch
from benchmark_utils import machine_line

from l2rclip.config import ModelConfig, Params, PromptConfig, from_dict
from l2rclip.data.dataset import RankImageDataset, make_loader
from l2rclip.data.sources import load_source
from l2rclip.data.store import ImageStore, spec_for, write_store
from l2rclip.models.backbone import TINY_ARCH, load_backbone
from l2rclip.models.factory import build_l2rclip
from l2rclip.models.recipe import resolve_recipe
from l2rclip.ranks import RankSpace
from l2rclip.training.fit_method import fit_method
from l2rclip.training.loop import FoldData, StoreBatches
from l2rclip.training.resume import TrainState

ROOT = Path(__file__).resolve().parents[1]


def fgnet_table(root: Path) -> tuple[pd.DataFrame, RankSpace]:
    table = load_source("fgnet", root)
    space = RankSpace(list(range(0, 70)))
    return table.assign(rank=space.indices(table["label"])), space


def build_store(table: pd.DataFrame, root: Path, arch: str, folder: Path) -> tuple[ImageStore, float]:
    tick = time.perf_counter()
    write_store(sorted(table["path"]), root, spec_for(resolve_recipe(arch, "none"), 0.0), folder)
    return ImageStore(folder), time.perf_counter() - tick


def files_pass(table: pd.DataFrame, root: Path, transform, batch: int, workers: int) -> float:
    """Seconds for one pass over the files through `transform` (decode + augment + normalise)."""
    loader = make_loader(RankImageDataset(table, root, transform), batch, shuffle=True, num_workers=workers)
    tick = time.perf_counter()
    for images, _ in loader:
        assert images.dtype == torch.float32
    return time.perf_counter() - tick


def store_pass(table: pd.DataFrame, store: ImageStore, batch: int, workers: int) -> float:
    """Seconds for one pass of the store's loader: the uint8 batches the device receives."""
    params = from_dict(Params, {"train": {"batch_size": batch, "num_workers": workers}})
    batches = StoreBatches(table, store, params.train, seed=0, device=torch.device("cpu"))
    batches.sampler.set_epoch(0)
    tick = time.perf_counter()
    for images, _ in batches.loader:
        assert images.dtype == torch.uint8
    return time.perf_counter() - tick


def store_cpu_pass(table: pd.DataFrame, store: ImageStore, batch: int, workers: int) -> float:
    """Seconds for one pass over the store with the crops and normalisation on this CPU."""
    params = from_dict(Params, {"train": {"batch_size": batch, "num_workers": workers}})
    batches = StoreBatches(table, store, params.train, seed=0, device=torch.device("cpu"))
    tick = time.perf_counter()
    for inputs, _ in batches.epoch(0):
        assert inputs["images"].dtype == torch.float32
    return time.perf_counter() - tick


def epoch_seconds(
    table: pd.DataFrame, root: Path, store: ImageStore | None, space: RankSpace, workers: int, folder: Path
) -> float:
    """Wall time of one training epoch of L2RCLIP-Tiny (no validation split), from files or store."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(TINY_ARCH, "none")
    config = ModelConfig(arch=TINY_ARCH, pretrained="none", prompt=PromptConfig(context_init="a photo of a"))
    model = build_l2rclip(backbone, space, config)
    params = from_dict(
        Params, {"train": {"epochs": 1, "warmup_epochs": 0, "num_workers": workers, "device": "cpu"}}
    )
    params = dataclasses.replace(params, model=config)
    data = FoldData(images=table, train=table, val=table.iloc[:0], root=root, store=store)
    times: list[float] = []
    fit_method(
        model,
        backbone,
        params,
        space,
        data,
        folder,
        0,
        torch.device("cpu"),
        TrainState("bench"),
        {},
        on_epoch=lambda metrics, epoch: times.append(metrics["epoch_seconds"]),
    )
    return times[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fgnet", type=Path, default=ROOT.parent / "shared/data/fgnet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="loader workers for both sides (default 1)")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    table, space = fgnet_table(args.fgnet)
    n = len(table)
    train_224 = open_clip.image_transform(224, is_train=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store_224, build_224 = build_store(table, args.fgnet, "ViT-B-16", tmp / "store224")
        store_64, build_64 = build_store(table, args.fgnet, TINY_ARCH, tmp / "store64")
        loader = {"files": [], "store": [], "store_cpu": []}
        epoch = {"files": [], "store": []}
        for repeat in range(args.repeats):
            loader["files"].append(files_pass(table, args.fgnet, train_224, args.batch, args.workers))
            loader["store"].append(store_pass(table, store_224, args.batch, args.workers))
            loader["store_cpu"].append(store_cpu_pass(table, store_224, args.batch, args.workers))
            epoch["files"].append(epoch_seconds(table, args.fgnet, None, space, args.workers, tmp / f"f{repeat}"))
            epoch["store"].append(
                epoch_seconds(table, args.fgnet, store_64, space, args.workers, tmp / f"s{repeat}")
            )
    med = {
        k: {side: statistics.median(v) for side, v in d.items()} for k, d in (("loader", loader), ("epoch", epoch))
    }
    print(
        f"\n{machine_line()}; {n} FG-NET images, batch {args.batch}, {args.workers} loader worker(s), "
        f"median of {args.repeats}\n"
    )
    print(f"store built once: 224 px {build_224:.1f} s ({n / build_224:.0f} images/s), 64 px {build_64:.1f} s\n")
    print("| measurement | from JPEG files | from the store | ratio | target |")
    print("|---|---|---|---|---|")
    print(
        f"| loader, 224 px, training mode (images/s) | {n / med['loader']['files']:.0f} | "
        f"{n / med['loader']['store']:.0f} | {med['loader']['files'] / med['loader']['store']:.1f}x | >= 10x |"
    )
    cpu = med["loader"]["store_cpu"]
    print(
        f"| the same, crops + normalisation on this CPU (images/s) | {n / med['loader']['files']:.0f} | "
        f"{n / cpu:.0f} | {med['loader']['files'] / cpu:.1f}x | - |"
    )
    print(
        f"| one L2RCLIP-Tiny epoch, 64 px (s) | {med['epoch']['files']:.2f} | {med['epoch']['store']:.2f} | "
        f"{med['epoch']['files'] / med['epoch']['store']:.1f}x | >= 3x |"
    )
    print(
        "\nall runs (s): "
        + "; ".join(
            f"{k} {side}: " + ", ".join(f"{x:.2f}" for x in v)
            for k, d in (("loader", loader), ("epoch", epoch))
            for side, v in d.items()
        )
    )


if __name__ == "__main__":
    main()
