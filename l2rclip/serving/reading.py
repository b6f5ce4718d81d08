"""Prediction inputs read in order, on threads ahead of the model, from files or the image store.

`l2rclip predict` on a large folder should run at the speed of the model in memory that does not
grow with the folder. So inputs are read in batches, in input order, by a pool of threads that
read up to `AHEAD` batches beyond the one the model is predicting (decoding and resizing in PIL
release the GIL, so the threads overlap with each other and with the model); at most
`(AHEAD + 1) * batch_size` read images exist at any time. An input that cannot be read becomes
its error message, on its own row, and the others go on.

A file that the preprocess stage's store holds unchanged (`ImageStore.locate`) is not decoded:
its stored uint8 pixels are normalised as the evaluate stage does (`l2rclip.data.batch_transforms`),
which with a store of margin 0 gives exactly the tensor the file's transform gives.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from l2rclip.data.batch_transforms import normalize, resize_to_input
from l2rclip.data.dataset import resolve_workers
from l2rclip.data.store import ImageStore, StoreError, open_store
from l2rclip.data.validate import check_image_file, load_image_file
from l2rclip.models.recipe import BackboneRecipe

log = logging.getLogger(__name__)

AHEAD = 2  # batches read beyond the one being predicted

Read = Callable[[int], torch.Tensor]  # input position -> (3, H, W); raises when the input is unreadable


@dataclass
class Batch:
    """One batch of inputs, read: the images that could be, and why the others could not."""

    positions: list[int]  # input positions, in order
    good: list[int] = field(default_factory=list)  # the positions that were read, in order
    images: torch.Tensor | None = None  # (B_ok, 3, H, W), one per `good` position
    errors: dict[int, str] = field(default_factory=dict)  # position -> "<ErrorType>: <message>"


def decoding_threads(workers: int | str | None) -> int:
    """Threads for `workers`: None one per CPU (as `data.decode_workers`), `auto` as loaders, else the number.

    Raises:
        ValueError: a negative number.
    """
    if workers is None:
        return os.cpu_count() or 1
    threads = resolve_workers(workers)
    if threads < 0:
        raise ValueError(f"decoding workers: expected 0 (read in this thread) or more, found {workers}")
    return threads


def read_batches(
    count: int, read: Read, batch_size: int, workers: int | str | None = 0
) -> Generator[Batch, None, None]:
    """The `count` inputs read by `read`, as batches of `batch_size` in input order.

    Args:
        count: number of inputs (positions 0..count-1).
        read: position -> input tensor (3, H, W); any exception is that input's error.
        batch_size: inputs per batch.
        workers: reading threads (see `decoding_threads`); 0 reads in the calling thread, between
            batches, without overlap.

    Closing the iterator early (an error or Ctrl+C in the consumer) cancels the reads not started.
    """
    if batch_size < 1:
        raise ValueError(f"batch size: expected at least 1, found {batch_size}")
    starts = range(0, count, batch_size)
    threads = decoding_threads(workers)
    if threads == 0:
        for start in starts:
            positions = list(range(start, min(start + batch_size, count)))
            yield _collate(positions, [_attempt(read, i) for i in positions])
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="l2rclip-read")
    pending: deque[tuple[list[int], list[Future]]] = deque()

    def submit(start: int) -> None:
        positions = list(range(start, min(start + batch_size, count)))
        pending.append((positions, [pool.submit(_attempt, read, i) for i in positions]))

    try:
        upcoming = iter(starts)
        for start in upcoming:  # the first batch and AHEAD - 1 after it; one more as each is taken
            submit(start)
            if len(pending) == AHEAD:
                break
        while pending:
            positions, futures = pending.popleft()
            results = [future.result() for future in futures]
            following = next(upcoming, None)
            if following is not None:
                submit(following)  # read on while the model predicts this batch
            yield _collate(positions, results)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _attempt(read: Read, position: int) -> tuple[torch.Tensor | None, str]:
    try:
        return read(position), ""
    except Exception as error:  # noqa: BLE001 - any unreadable input is reported on its own row
        return None, f"{type(error).__name__}: {error}"


def _collate(positions: list[int], results: list[tuple[torch.Tensor | None, str]]) -> Batch:
    """Stack the readable images of a batch; keep the others' errors by input position."""
    batch = Batch(positions)
    images = []
    for position, (image, error) in zip(positions, results, strict=True):
        if image is None:
            batch.errors[position] = error
        else:
            batch.good.append(position)
            images.append(image)
    batch.images = torch.stack(images) if images else None  # (B_ok, 3, H, W)
    return batch


def prediction_store(folder: str | Path, recipe: BackboneRecipe) -> ImageStore:
    """The image store at `folder`, when its pixels are exactly what the model's transform makes of files.

    That is: made for the model's preprocessing (`open_store`'s check against its backbone
    recipe) with margin 0 (a margin resamples the stored pixels a second time), holding images
    (not `preprocess.enabled: false`) and knowing its image root.

    Raises:
        StoreError: why this store cannot stand in for the files.
    """
    folder = Path(folder)
    store = open_store(folder, recipe, margin=None)
    if store is None:
        raise StoreError(f"{folder} holds no images: the preprocess stage ran with preprocess.enabled: false")
    if store.spec.side != store.spec.image_size:
        raise StoreError(
            f"the image store {folder} holds {store.spec.side} px images for a {store.spec.image_size} px "
            "input (preprocess.margin > 0): resized again they would not give the files' predictions "
            "exactly; prediction reads a store made with margin 0"
        )
    if store.root is None:
        raise StoreError(
            f"the image store {folder} does not record its image root (made by an older version); "
            "run `dvc repro preprocess --force`"
        )
    return store


class PathReader:
    """Image files as the model's input tensors; from the store where it holds the file unchanged.

    Args:
        paths: the files, by input position.
        transform: the model's evaluation transform (PIL image -> (3, H, W)).
        max_pixels: the decompression-bomb limit, checked on every file (the store's too).
        store: a `prediction_store`, or None to decode every file.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        transform: Callable,
        max_pixels: int,
        store: ImageStore | None = None,
    ):
        self.paths, self.transform, self.max_pixels, self.store = paths, transform, max_pixels, store
        self.from_store = 0  # inputs read from the store so far
        self._lock = threading.Lock()

    def __call__(self, position: int) -> torch.Tensor:
        """The input tensor (3, H, W) of the file at `position`."""
        path = self.paths[position]
        store = self.store
        location = store.locate(path) if store is not None else None
        if store is None or location is None:
            return self.transform(load_image_file(path, self.max_pixels))
        check_image_file(path, self.max_pixels)  # the same error as decoding for a bad or too large file
        with self._lock:
            self.from_store += 1
        spec = store.spec
        return normalize(resize_to_input(store.gather([location]), spec.image_size), spec)[0]  # (3, H, W)
