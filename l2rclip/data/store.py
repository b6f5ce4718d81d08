"""The image store: every good image decoded once, resized and cropped, kept as uint8 tensors.

Decoding and resizing a JPEG costs a CPU core about 5 ms; a GPU trains on an image in well under
1 ms. So the `preprocess` stage decodes every image of the prepared set once, with the same
`load_rgb` as validation (EXIF orientation, modes, the bomb limit), applies the *geometric part* of
the backbone's own evaluation transform (open_clip's resize (shortest side, longest side or squash,
as the backbone recipe's `resize_mode` says) + centre crop or pad, with its interpolation) at side
`S = round(image_size * (1 + margin))`, and writes the pixels as uint8. The preprocessing is the
backbone recipe's (`l2rclip.models.recipe`): the one the trained model stores and is checked against.

Layout of the store folder (a DVC output):
    store.json           the spec (`StoreSpec`: model input size, stored side, interpolation,
                         resize mode, mean, std, fill, arch), the backbone recipe, the shard list
                         and the image root (relative to the store folder when data.root is relative).
    index.csv            path, shard, row: where each image of `images.csv` lies.
    shard_00000.npy ...  uint8 arrays (n, S, S, 3), at most `shard_size` images each, read
                         memory-mapped, so a worker touches only the pages of its batch.

With `margin: 0` the stored pixels are exactly what the evaluation transform feeds to ToTensor, so
evaluating from the store gives the same numbers as from the files (tested). A margin keeps room
for the training crops; evaluation then resizes the stored crop down to the input size (a second
resampling: predictions agree closely, not bit for bit). Normalisation (mean, std) and training
augmentation happen per batch, on the training device (`l2rclip.data.batch_transforms`).
`l2rclip predict` reads a file's pixels from the store (`ImageStore.locate`) when the store holds
that file unchanged and was made with margin 0; other inputs are decoded from their files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import open_clip
import pandas as pd
import torch
from open_clip.transform import MaybeConvertMode, MaybeToTensor
from torch.utils.data import Dataset
from torchvision.transforms import Compose

from l2rclip.data.validate import load_rgb
from l2rclip.progress import progress

if TYPE_CHECKING:
    from l2rclip.models.recipe import BackboneRecipe

log = logging.getLogger(__name__)

SPEC_FILE, INDEX_FILE = "store.json", "index.csv"


class StoreError(ValueError):
    """A store is missing, incomplete, or was made for another preprocessing than the model's."""


@dataclass(frozen=True)
class StoreSpec:
    """What the stored pixels are: the backbone recipe's preprocessing and the stored side."""

    arch: str
    image_size: int  # the model's input side
    side: int  # the stored side, image_size * (1 + margin)
    interpolation: str
    resize_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fill_color: int = 0  # padding of resize_mode `longest` (absent from stores made before it was kept)

    def matches(self, other: StoreSpec) -> bool:
        """Same pixels: everything but the arch name (two archs may share a preprocessing)."""
        return {**asdict(self), "arch": None} == {**asdict(other), "arch": None}


def spec_for(recipe: BackboneRecipe, margin: float) -> StoreSpec:
    """The store spec of a backbone recipe's preprocessing, stored with `margin` around the input."""
    pre = recipe.preprocess
    height, width = pre.size
    if height != width:
        raise StoreError(
            f"{recipe.arch}: non-square input {pre.size} is not supported by the image store; "
            "set preprocess.enabled: false"
        )
    if margin < 0:
        raise StoreError(f"preprocess.margin: expected >= 0, found {margin}")
    return StoreSpec(
        arch=recipe.arch,
        image_size=int(height),
        side=round(height * (1 + margin)),
        interpolation=pre.interpolation,
        resize_mode=pre.resize_mode,
        mean=tuple(pre.mean),
        std=tuple(pre.std),
        fill_color=pre.fill_color,
    )


def geometric_transform(spec: StoreSpec) -> Compose:
    """open_clip's evaluation transform at the stored side, up to (not including) the tensor conversion."""
    full = open_clip.image_transform(
        spec.side,
        is_train=False,
        mean=spec.mean,
        std=spec.std,
        resize_mode=spec.resize_mode,
        interpolation=spec.interpolation,
        fill_color=spec.fill_color,
    )
    steps: list[Any] = []  # torchvision transforms (PIL image -> PIL image)
    for step in full.transforms:
        if isinstance(step, (MaybeConvertMode, MaybeToTensor)):
            return Compose(steps)
        steps.append(step)
    raise StoreError(f"open_clip's evaluation transform has no tensor conversion: {full}")


def write_store(
    paths: Sequence[str],
    root: str | Path,
    spec: StoreSpec,
    out_dir: Path,
    shard_size: int = 4096,
    workers: int | None = None,
    recipe: BackboneRecipe | None = None,
) -> dict[str, Any]:
    """Decode `paths` (relative to `root`) once into a store at `out_dir`; returns store.json's content.

    `recipe`, the backbone recipe the spec came from, is recorded in store.json for the reader.

    Decoding runs on `workers` threads (PIL releases the GIL); shards are written in path order,
    so the same inputs give byte-identical files.
    """
    if shard_size < 1:
        raise StoreError(f"preprocess.shard_size: expected >= 1, found {shard_size}")
    transform, root = geometric_transform(spec), Path(root)
    out_dir.mkdir(parents=True, exist_ok=True)

    def pixels(path: str) -> np.ndarray:
        image = np.asarray(transform(load_rgb(root / path)), dtype=np.uint8)  # (S, S, 3)
        if image.shape != (spec.side, spec.side, 3):
            raise StoreError(
                f"{root / path}: expected {spec.side}x{spec.side} RGB after the transform, "
                f"found shape {image.shape}"
            )
        return image

    shards, index = [], []
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        for number, start in enumerate(range(0, len(paths), shard_size)):
            chunk = list(paths[start : start + shard_size])
            name = f"shard_{number:05d}.npy"
            array = np.lib.format.open_memmap(
                out_dir / name, mode="w+", dtype=np.uint8, shape=(len(chunk), spec.side, spec.side, 3)
            )
            decoded = progress(pool.map(pixels, chunk), f"preprocess shard {number}", len(chunk), "image", log)
            for row, image in enumerate(decoded):
                array[row] = image
            array.flush()
            del array
            shards.append({"file": name, "images": len(chunk)})
            index += [(path, number, row) for row, path in enumerate(chunk)]
            log.info("preprocess: %d / %d images", start + len(chunk), len(paths))
    pd.DataFrame(index, columns=["path", "shard", "row"]).to_csv(
        out_dir / INDEX_FILE, index=False, lineterminator="\n"
    )
    content = {
        "spec": asdict(spec),
        "shards": shards,
        "images": len(paths),
        "root": _recorded_root(root, out_dir),
        **({"recipe": recipe.to_dict()} if recipe is not None else {}),
    }
    (out_dir / SPEC_FILE).write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
    return content


def _recorded_root(root: Path, out_dir: Path) -> str:
    """The image root as store.json keeps it: relative to the store folder unless it is absolute.

    `data.root` is usually relative to the checkout (`data/demo`), and so is the store
    (`outputs/preprocess`): kept as `../../data/demo`, it still names the images in another clone.
    """
    if root.is_absolute():
        return str(root)
    return os.path.relpath(os.path.abspath(root), os.path.abspath(out_dir))


class ImageStore:
    """A store opened for reading: `spec`, and `gather(paths)` -> uint8 (N, 3, S, S)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        spec_file = self.folder / SPEC_FILE
        if not spec_file.is_file():
            raise StoreError(
                f"expected an image store at {self.folder} ({SPEC_FILE} missing); run `dvc repro preprocess`"
            )
        content = json.loads(spec_file.read_text(encoding="utf-8"))
        spec = content["spec"]
        self.spec = StoreSpec(**{**spec, "mean": tuple(spec["mean"]), "std": tuple(spec["std"])})
        self.recipe = content.get("recipe")
        self.shard_files = [self.folder / s["file"] for s in content["shards"]]
        index = pd.read_csv(self.folder / INDEX_FILE, dtype={"path": str}, keep_default_na=False)
        self.location = dict(zip(index["path"], zip(index["shard"], index["row"], strict=True), strict=True))
        self._shards: dict[int, np.ndarray] = {}
        recorded = content.get("root")  # absent from stores made before it was kept
        self.root = None if recorded is None else os.path.abspath(self.folder / recorded)
        self.written_ns = (self.folder / INDEX_FILE).stat().st_mtime_ns  # written after every shard

    def check(self, expected: StoreSpec) -> None:
        """Fail unless the stored pixels are what a model with `expected` preprocessing needs."""
        if not self.spec.matches(expected):
            raise StoreError(
                f"the image store {self.folder} was made for {asdict(self.spec)}, but the model "
                f"needs {asdict(expected)}; run `dvc repro preprocess` (with --force when params "
                "did not change, e.g. CLIP weights became available after a fallback run)"
            )

    def rows(self, paths: Sequence[str]) -> list[tuple[int, int]]:
        """(shard, row) of each path; a path the store lacks is an error naming it."""
        missing = [p for p in paths if p not in self.location]
        if missing:
            raise StoreError(
                f"{len(missing)} images are not in the store {self.folder}, e.g. {missing[0]}; "
                "the store is older than the prepared data: run `dvc repro preprocess`"
            )
        return [self.location[p] for p in paths]

    def locate(self, path: str | Path) -> tuple[int, int] | None:
        """(shard, row) of the image file `path` (any spelling of it), or None when the store lacks it.

        None also when the file changed after the store was written (modified later than its
        index), so that stale pixels are never used for a file edited since `preprocess`, or when
        the store does not know its image root (made before store.json recorded it). Symlinks are
        not resolved: `path` must lie under the root as written.
        """
        if self.root is None:
            return None
        location = self.location.get(os.path.relpath(os.path.abspath(path), self.root))
        if location is None:
            return None
        try:
            changed = os.stat(path).st_mtime_ns > self.written_ns
        except OSError:  # gone meanwhile: reading the file reports why
            return None
        return None if changed else location

    def gather(self, locations: Sequence[tuple[int, int]]) -> torch.Tensor:
        """uint8 (N, 3, S, S) of the images at `locations`, one fancy-index read per shard."""
        out = np.empty((len(locations), self.spec.side, self.spec.side, 3), dtype=np.uint8)
        by_shard: dict[int, list[int]] = {}
        for i, (shard, _) in enumerate(locations):
            by_shard.setdefault(int(shard), []).append(i)
        for shard, positions in by_shard.items():
            rows = [locations[i][1] for i in positions]
            out[positions] = self._shard(shard)[rows]
        return torch.from_numpy(out).permute(0, 3, 1, 2)  # (N, 3, S, S), a view of the copy

    def _shard(self, number: int) -> np.ndarray:
        if number not in self._shards:  # opened lazily, per process (loader workers included)
            self._shards[number] = np.load(self.shard_files[number], mmap_mode="r")
        return self._shards[number]


def open_store(folder: Path | None, recipe: BackboneRecipe, margin: float | None) -> ImageStore | None:
    """The store at `folder` checked against the backbone recipe's preprocessing; None: read the image files.

    None when `folder` is None (library use) or the preprocess stage ran with `enabled: false`.
    `margin` None accepts the stored side, whatever margin made it (the caller checks it).
    """
    if folder is None:
        return None
    spec_file = Path(folder) / SPEC_FILE
    if spec_file.is_file() and json.loads(spec_file.read_text(encoding="utf-8")).get("enabled") is False:
        return None
    store = ImageStore(folder)
    expected = spec_for(recipe, 0.0 if margin is None else margin)
    store.check(expected if margin is not None else replace(expected, side=store.spec.side))
    return store


class StoreDataset(Dataset):
    """The images of a split table, read from an `ImageStore`, with their rank indices.

    Defines `__getitems__`, so a DataLoader fetches each batch with one read per shard instead of
    one per image; items are uint8 (3, S, S) and batches uint8 (B, 3, S, S). Keys are row indices,
    or `(index, real)` pairs from `l2rclip.training.distributed.GlobalBatchSampler`, whose padding rows
    (`real` False) get the label -1.
    """

    def __init__(self, table: pd.DataFrame, store: ImageStore):
        self.store = store
        self.locations = store.rows(list(table["path"]))
        self.ranks = torch.tensor(table["rank"].to_numpy(dtype=np.int64))  # a copy: pandas arrays are read-only

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.store.gather([self.locations[index]])[0], int(self.ranks[index])

    def __getitems__(self, keys: list) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [key if isinstance(key, tuple) else (key, True) for key in keys]
        indices = [index for index, _ in pairs]
        labels = self.ranks[indices].clone()  # (B,)
        labels[[not real for _, real in pairs]] = -1
        return self.store.gather([self.locations[i] for i in indices]), labels


def collate_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The DataLoader collate for `StoreDataset.__getitems__`, which already returns a batch."""
    return batch
