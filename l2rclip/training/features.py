"""Frozen image features, computed once and reused.

With the image tower frozen (two-stage stage 1, or `model.image_tower: frozen`) every epoch would
encode the same images through the same weights again. Instead, all images of the prepared set
are encoded once (evaluation transform, no augmentation) and stored as safetensors under a key
made of the backbone recipe (architecture, activation and preprocessing: the weights alone do not
say whether the tower runs GELU or QuickGELU), the image tower's weights, the transform, and every
file's path, size and modification time; any change to one of these gives a new key, so a stale
cache is never read. All folds of
a run share one file.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from l2rclip.data.batch_transforms import store_eval_batches
from l2rclip.data.dataset import RankImageDataset, make_loader
from l2rclip.data.store import ImageStore
from l2rclip.models.heads import OrdinalHeadModel
from l2rclip.models.l2rclip import L2RCLIP
from l2rclip.models.recipe import recipe_of
from l2rclip.progress import progress
from l2rclip.runtime import autocast

log = logging.getLogger(__name__)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Hash of a module's parameters and buffers (names, shapes, dtypes and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def images_fingerprint(paths: list[Path]) -> str:
    """Hash of the files' paths, sizes and modification times (as DVC judges changes)."""
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def feature_cache_file(
    model: L2RCLIP | OrdinalHeadModel,
    table: pd.DataFrame,
    root: str | Path,
    transform: Callable,
    cache_dir: str | Path,
    store: ImageStore | None = None,
) -> Path:
    """The file holding (or to hold) the features of `table`'s images through `model`'s image tower.

    The name is a hash of everything the features depend on, so an existing file is never stale.
    """
    # The key says where the pixels come from: the files and the transform, or the store's shards.
    source = (
        f"{store.spec}|{images_fingerprint(store.shard_files)}"
        if store is not None
        else f"{transform!r}|{images_fingerprint([Path(root) / p for p in table['path']])}"
    )
    key = hashlib.blake2b(digest_size=16)
    for part in (recipe_of(model).key(), weights_fingerprint(model.image_encoder), source):
        key.update(part.encode())
    return Path(cache_dir) / f"features-{key.hexdigest()}.safetensors"


def read_feature_cache(
    model: L2RCLIP | OrdinalHeadModel,
    images: pd.DataFrame,
    root: str | Path,
    transform: Callable,
    cache_dir: str | Path,
    store: ImageStore | None = None,
) -> torch.Tensor | None:
    """The cached features of every row of `images` through `model`'s tower, (N, E); None without them.

    A model trained with its image tower frozen (`model.image_tower: frozen`, or `auto` on a CPU
    with a real CLIP) has the very tower the training stage encoded every prepared image with, so
    evaluation and calibration read those features (`rows_of` picks a split's) instead of encoding
    again (on a CPU with ViT-B-16, minutes per fold). A fine-tuned tower has other weights, hence
    another key and no file: its images are encoded as usual. Reading never writes a cache.
    """
    file = feature_cache_file(model, images, root, transform, cache_dir, store)
    if not file.is_file():
        return None
    features = load_file(file)["features"]  # (N, E), in `images` order
    if len(features) != len(images):
        return None  # not this table's cache: encode instead
    log.info("image features: reusing %s for the %d prepared images (frozen image tower)", file, len(images))
    return features


def rows_of(features: torch.Tensor, images: pd.DataFrame, split: pd.DataFrame) -> torch.Tensor:
    """`split`'s rows of `features` (N, E), which follow `images`' order: (n, E) in `split`'s order."""
    index = {path: i for i, path in enumerate(images["path"])}
    return features[[index[p] for p in split["path"]]]


def cached_image_features(
    model: L2RCLIP | OrdinalHeadModel,
    table: pd.DataFrame,
    root: str | Path,
    transform: Callable,
    cache_dir: str | Path,
    device: torch.device,
    batch_size: int = 64,
    num_workers: int | str = 0,
    amp: bool = False,
    store: ImageStore | None = None,
) -> torch.Tensor:
    """L2-normalised features of every image in `table`, in table order: (N, E), on the CPU.

    Args:
        model: a model with `image_encoder` and `encode_images` (L2RCLIP or an ordinal head), built
            by `build_model` (it carries its backbone recipe).
        table: rows with `path` (relative to `root`) and `rank`.
        root: image root.
        transform: the evaluation transform.
        cache_dir: where feature files live.
        device: where to encode.
        batch_size: images per encoding batch.
        num_workers: loader processes.
        amp: mixed precision on CUDA.
        store: read the images from this store (`l2rclip.data.store`) instead of the files.
    """
    root = Path(root)
    file = feature_cache_file(model, table, root, transform, cache_dir, store)
    if file.is_file():
        log.info("image features: reusing %s (%d images)", file, len(table))
        return load_file(file)["features"]
    log.info("image features: encoding %d images once (frozen image tower) into %s", len(table), file)
    if store is not None:
        batches = store_eval_batches(table, store, batch_size, num_workers, device)
    else:
        loader = make_loader(
            RankImageDataset(table, root, transform),
            batch_size,
            shuffle=False,
            num_workers=num_workers,
            device=device,
        )
        batches = (images.to(device, non_blocking=True) for images, _ in loader)
    chunks = []
    model.eval()
    with torch.no_grad():
        for images in progress(batches, "encoding image features", -(-len(table) // batch_size), "batch", log):
            with autocast(device, amp):
                chunks.append(model.encode_images(images).float().cpu())  # (B, E)
    features = torch.cat(chunks)  # (N, E)
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_suffix(".partial")
    save_file({"features": features}, partial)
    partial.replace(file)  # atomic: a killed run never leaves a half-written cache
    return features
